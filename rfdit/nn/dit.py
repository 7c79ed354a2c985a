"""The Diffusion Transformer (Peebles & Xie, 2023) as Equinox modules, channels-last.

One example per call: `DiT(cfg, key=...)(x, t, y)` maps x (H, W, C), t () and y () to
(H, W, out_channels). Batches go through `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import DiTConfig

NUM_FREQUENCIES = 256

# What a block keeps for its backward pass (see `DiT`): "none" does not wrap it in jax.checkpoint.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the linear layers' outputs
    "full": jax.checkpoint_policies.nothing_saveable,
}


def sincos_pos_embed(hidden_size: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position table, (grid_size², hidden_size), float32.

    The first half of the features encodes the column (w) index and the second half
    the row (h) index, as in MAE/DiT, so published tables compare equal.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size (={hidden_size}) must be divisible by 4 for the 2-D sin-cos table.")
    omega = 1.0 / 10000 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size / 4.0))
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in DiT

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(grid_w), encode(grid_h)], axis=1).astype(np.float32)


def timestep_features(t: Float[Array, ""], dim: int = NUM_FREQUENCIES, max_period: float = 10000.0):
    """`[cos(t·f_i), sin(t·f_i)]` with `f_i = exp(-ln(max_period)·i/(dim/2))` (DiT's order)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)])


def _layer_norm(x: Float[Array, "... d"], eps: float = 1e-6) -> Float[Array, "... d"]:
    """Parameter-free LayerNorm, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _broadcast_like(v: Float[Array, " d"], x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """v (float32) broadcast to x's shape, then cast to x's dtype, so that the backward pass casts the
    cotangent up before summing it. Only for v that vary per example (the conditioning): under vmap
    the batch's broadcast of an unbatched v would come after the cast, and sum in bf16."""
    return jnp.broadcast_to(v, x.shape).astype(x.dtype)


@jax.custom_jvp
def _add_bias(y: Float[Array, "... d"], bias: Float[Array, " d"]) -> Float[Array, "... d"]:
    """y + bias in y's dtype, with the bias gradient summed in float32 over every axis but the last,
    batch included (`_add_bias_jvp`)."""
    return y + jnp.broadcast_to(bias, y.shape).astype(y.dtype)


def _add_bias_jvp(primals, tangents):
    """The tangent is formed in float32 and cast once, so the gradient (its transpose) casts the
    cotangent up and then sums it. As a plain cast and add, the batch's sum came after the cast under
    vmap (the batch's broadcast of an unbatched bias is added last), in bf16: up to a few per cent
    off per element, ~1% over the whole array, for 256 examples (test_dit.py). An earlier version
    added the bias, the modulation and the gated residual in float32 instead, which is exact but kept
    XLA from fusing those adds with their neighbours: 1% slower per DiT-B/2 step on an H100 with the
    float32 residual stream, 8% with the bf16 one (BENCHMARKS.md)."""
    (y, bias), (dy, dbias) = primals, tangents
    if isinstance(dbias, SymbolicZero):  # JAX does not call this rule when both tangents are zero
        return _add_bias(y, bias), dy
    # without a tangent for y (an input that is not differentiated), zeros in its place that carry
    # y's batch (jnp.zeros_like would not: under vmap it is unbatched), so that the batch's broadcast
    # of dbias still comes before the cast; the transpose does not keep them
    y32 = y.astype(jnp.float32)
    dy32 = jnp.where(True, jnp.float32(0), y32) if isinstance(dy, SymbolicZero) else dy.astype(jnp.float32)
    return _add_bias(y, bias), (dy32 + jnp.broadcast_to(dbias.astype(jnp.float32), y.shape)).astype(y.dtype)


_add_bias.defjvp(_add_bias_jvp, symbolic_zeros=True)


def _modulate(x: Float[Array, "n d"], shift: Float[Array, " d"], scale: Float[Array, " d"]) -> Float[Array, "n d"]:
    """x·(1 + scale) + shift in x's dtype, written x + x·scale + shift: in bf16, 1 + scale would be
    rounded first, to steps of 2⁻⁸ (2⁻⁷ above 1), which adds an error as large as the output's own
    rounding to small scales (adaLN-Zero starts them at 0). The conditioning's gradients are summed
    in float32."""
    return x + x * _broadcast_like(scale, x) + _broadcast_like(shift, x)


def _gated_residual(x: Float[Array, "n d"], gate: Float[Array, " d"], h: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """x + gate·h in x's dtype; the gate's gradient is summed in float32."""
    return x + _broadcast_like(gate, x) * h.astype(x.dtype)


def _unrolled_bf16_on_cpu(dtype) -> bool:
    """Whether a model of this compute dtype runs its blocks unrolled and without remat by default:
    bf16 on CPUs (`resolve_remat`, `resolve_scan_unroll`)."""
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16


def resolve_remat(remat: bool | str | None, dtype: str = "float32") -> str:
    """A `remat` setting as one of REMAT_POLICIES' names: True and False mean "full" and "none".

    None is "none" on accelerators, where "dots" ran 8% slower (DiT-B/2 bf16 on an H100, bf16
    residual stream), and on CPUs for bf16 models, whose blocks run unrolled there
    (`resolve_scan_unroll`): the core configs trained 1.08x and 1.18x as fast as with a scan and "dots"
    (BENCHMARKS.md). For float32 models on CPUs it is "dots": recomputing the cheap activations beat
    storing them in a scan (the core configs and the digits run, 7-30% faster per step), and unrolled
    float32 blocks ran slower, their weight gradients' transposes fused with elementwise chains."""
    if remat is None:
        return "dots" if jax.default_backend() == "cpu" and not _unrolled_bf16_on_cpu(dtype) else "none"
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat (={remat!r}) must be one of {list(REMAT_POLICIES)} (or a bool).")
    return remat


def resolve_scan_unroll(
    scan_unroll: int | None, depth: int, *, sharded_params: bool = False, dtype: str = "float32"
) -> int:
    """Blocks unrolled per scan iteration. None is 1 with sharded parameters (FSDP), where a scan
    gathers one block's weights at a time, and for float32 models on CPUs (see `resolve_remat`).
    Elsewhere it is the full depth: DiT-B/2 trained 1.6x faster on an H100 (169 -> 106 ms) and 18%
    faster on an H200, for a compile of 25-40 s instead of 10; bf16 models on CPUs, where a scan's
    stacked activations (zeroed, copied, written and read back once per step) cost more than
    recomputing them, trained the core configs 1.08x and 1.18x as fast unrolled and without remat."""
    if scan_unroll is None:
        if sharded_params or (jax.default_backend() == "cpu" and not _unrolled_bf16_on_cpu(dtype)):
            return 1
        return depth
    if scan_unroll < 1:
        raise ValueError(f"scan_unroll (={scan_unroll}) must be >= 1.")
    return min(scan_unroll, depth)


def _bf16_products_write_float32() -> bool:
    """Whether bf16 products write float32 here: on CPUs. On one with AVX512-BF16 (a 2-core EPYC) XLA
    multiplied bf16 operands into a float32 result at 1.8 times the float32 rate and 2.2 times the
    rate into a bf16 result (experiments/bench_products.py, BENCHMARKS.md); a CPU without those
    instructions may run bf16 slower than float32. Accelerators write bf16 (see `Linear`)."""
    return jax.default_backend() == "cpu"


@custom_vmap
def _outer_sum(g: Array, x: Array, weight: Array) -> Float[Array, "o i"]:
    """sum over every leading axis of g ⊗ x, in float32: the gradient (o, i) of `weight` from the
    output's cotangent (..., o) and the input (..., i). `weight` only says, under vmap, whether each
    example has its own (`_outer_sum_vmap`)."""
    if g.dtype == jnp.float32 and x.shape[-1] < g.shape[-1]:  # transpose the narrower operand
        return jnp.einsum("...i,...o->io", x, g).T  # (XLA's CPU fallback for dots rejects bf16 here)
    return jnp.einsum("...o,...i->oi", g, x, preferred_element_type=jnp.float32)


@_outer_sum.def_vmap
def _outer_sum_vmap(axis_size: int, in_batched: list[bool], g: Array, x: Array, weight: Array):
    g = g if in_batched[0] else jnp.broadcast_to(g, (axis_size, *g.shape))
    x = x if in_batched[1] else jnp.broadcast_to(x, (axis_size, *x.shape))
    if in_batched[2]:  # a weight per example (e.g. models stacked by vmap): a gradient per example
        return jnp.einsum("b...o,b...i->boi", g, x, preferred_element_type=jnp.float32), True
    # One weight for the batch (the loss vmaps the model over examples, inside grad): its gradient sums
    # the batch axis in the same product. The custom VJP's batched rule would form one (o, i) product
    # per example and sum them afterwards: B times the memory, and for a 256→1024 layer at 16 examples
    # of 64 tokens 23.7 ms per forward and backward pass against 2.8 ms (bench_products.py). The rule cannot
    # tell this vmap from one outside grad, so per-example gradients of one shared weight (vmap of grad,
    # jacrev) would come out summed: `with_bf16_backward` is for losses over a batch.
    return _outer_sum(g, x, weight), False


def _bf16_product(x: Float[Array, "... i"], weight: Float[Array, "o i"]) -> Float[Array, "... o"]:
    return jnp.matmul(x.astype(jnp.bfloat16), weight.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@custom_vmap
def _leading_sum(g: Array, bias: Array) -> Float[Array, " o"]:
    """sum over every leading axis of g, in float32: the gradient of `bias` from the output's
    cotangent. As `_outer_sum`, a batch of examples sharing one bias sums in the same reduction."""
    return jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))


@_leading_sum.def_vmap
def _leading_sum_vmap(axis_size: int, in_batched: list[bool], g: Array, bias: Array):
    g = g if in_batched[0] else jnp.broadcast_to(g, (axis_size, *g.shape))
    if in_batched[1]:  # a bias per example: a gradient per example
        return jnp.sum(g.astype(jnp.float32), axis=tuple(range(1, g.ndim - 1))), True
    return _leading_sum(g, bias), False


@ft.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bf16_linear_bf16_backward(x, weight, bias, x_dtype: str, weight_dtype: str, out_dtype: str):
    """x W^T + b from bf16 operands, added in float32 and cast once to `out_dtype`: the CPU form of
    `Linear` under `with_bf16_backward`. Its backward pass rounds the cotangent to bf16 and
    multiplies bf16 operands into float32 as well, as the forward pass does and as under PyTorch's
    autocast; autodiff would multiply the float32 cotangent by the bf16 operands, which XLA runs as
    float32 products, at half the speed on CPUs. The weight gradient sums the batch in one product
    (`_outer_sum`), the bias gradient in one float32 sum (`_leading_sum`). The bias and the cast
    inside the custom VJP keep a bf16 cotangent bf16 on its way to the products: through a separate
    cast and add, autodiff casts it up to float32 and the backward pass rounds it back, two passes
    over the activations that XLA does not fold."""
    return _biased(_bf16_product(x, weight), bias, out_dtype)


def _biased(y: Float[Array, "... o"], bias: Float[Array, " o"], out_dtype: str) -> Float[Array, "... o"]:
    return (y + jnp.broadcast_to(bias, y.shape)).astype(out_dtype)


def _bf16_linear_fwd(x, weight, bias, x_dtype, weight_dtype, out_dtype):
    xb, wb = x.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    return _biased(_bf16_product(xb, wb), bias, out_dtype), (xb, wb, bias)


def _bf16_linear_bwd(x_dtype, weight_dtype, out_dtype, residuals, g):
    xb, wb, bias = residuals  # the bias only tells `_leading_sum`, under vmap, whether it is per example
    gb = g.astype(jnp.bfloat16)
    dx = jnp.matmul(gb, wb, preferred_element_type=jnp.float32).astype(x_dtype)
    return dx, _outer_sum(gb, xb, wb).astype(weight_dtype), _leading_sum(g, bias).astype(bias.dtype)


_bf16_linear_bf16_backward.defvjp(_bf16_linear_fwd, _bf16_linear_bwd)


@ft.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_product_bf16(patches: Float[Array, "n k"], weight: Float[Array, "o k"], patches_dtype: str) -> Float[Array, "n o"]:
    """The patch embedding's product from bf16 operands into float32 (`_bf16_product`), whose weight
    gradient is summed in float32 as (patches^T g)^T (`_outer_sum`): the transposed operand is the
    narrow patches (n, p²C), not the cotangent (n, o). Transposing the cotangent, XLA's CPU backend
    fused the whole residual stream's gradient into that strided copy once the blocks were unrolled:
    8.7 ms of a 23 ms step for the debug config. At k = p²C the float32 products cost next to
    nothing."""
    return _bf16_product(patches, weight)


def _patch_product_fwd(patches, weight, patches_dtype):
    xb = patches.astype(jnp.bfloat16)
    return _bf16_product(xb, weight), (xb, weight)


def _patch_product_bwd(patches_dtype, residuals, g):
    xb, weight = residuals
    g32 = g.astype(jnp.float32)
    dx = jnp.matmul(g32, weight.astype(jnp.bfloat16).astype(jnp.float32))  # dropped by XLA when unused
    return dx.astype(patches_dtype), _outer_sum(g32, xb.astype(jnp.float32), weight).astype(weight.dtype)


_patch_product_bf16.defvjp(_patch_product_fwd, _patch_product_bwd)


def product(x: Float[Array, "... i"], weight: Float[Array, "o i"], dtype: str) -> Float[Array, "... o"]:
    """x W^T computed in `dtype`, accumulated in float32. With bf16 operands the result is float32 on
    CPUs (`_bf16_products_write_float32`) and bf16 elsewhere, where a bf16 result already makes the
    backward pass bf16; on CPUs the training step's layers get that from custom VJPs
    (`with_bf16_backward`)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and _bf16_products_write_float32():
        return _bf16_product(x, weight)
    return jnp.matmul(x.astype(dtype), weight.T.astype(dtype), preferred_element_type=dtype)


class Linear(eqx.Module):
    """y = x W^T + b, computed in `dtype` (float32 by default, bfloat16 for mixed precision)."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]
    dtype: str = eqx.field(static=True, default="float32")
    bf16_backward: bool = eqx.field(static=True, default=False)

    def __call__(self, x: Float[Array, "... in"], *, out_dtype: str | None = None) -> Float[Array, "... out"]:
        """The product accumulates in float32 (`product`); the result comes back in `out_dtype`, by
        default the input's dtype (the compute dtype halves the memory traffic of wide activations
        under bf16).

        On accelerators a bf16 product also writes bf16, as under PyTorch's autocast: a float32 output
        would make the backward pass's products float32 too (the cotangent is float32), and on an H100
        those ran as TF32 at half the bf16 rate, 207 ms per DiT-B/2 step against 106 ms
        (BENCHMARKS.md). On CPUs the product writes float32, and `bf16_backward` (set for training by
        `with_bf16_backward`) keeps the backward pass in bf16 operands."""
        out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
        if self.bf16_backward and jnp.dtype(self.dtype) == jnp.bfloat16 and _bf16_products_write_float32():
            return _bf16_linear_bf16_backward(x, self.weight, self.bias, str(x.dtype), str(self.weight.dtype),
                                              str(out_dtype))
        return _add_bias(product(x, self.weight, self.dtype), self.bias).astype(out_dtype)


def _xavier(key: PRNGKeyArray, out_features: int, in_features: int, dtype: str) -> Linear:
    limit = math.sqrt(6.0 / (in_features + out_features))
    weight = jr.uniform(key, (out_features, in_features), minval=-limit, maxval=limit)
    return Linear(weight, jnp.zeros((out_features,)), dtype)


def _normal(key: PRNGKeyArray, out_features: int, in_features: int, dtype: str, std: float = 0.02) -> Linear:
    return Linear(std * jr.normal(key, (out_features, in_features)), jnp.zeros((out_features,)), dtype)


def _zeros(out_features: int, in_features: int, dtype: str) -> Linear:
    return Linear(jnp.zeros((out_features, in_features)), jnp.zeros((out_features,)), dtype)


class LayerNorm(eqx.Module):
    """LayerNorm with an affine transform (used only by the optional q/k norm).

    eps is PyTorch's default (1e-5), as timm's q/k norm in REPA uses it.
    """

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True, default=1e-5)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return _add_bias(_layer_norm(x, eps=self.eps) * self.weight.reshape((1,) * (x.ndim - 1) + self.weight.shape), self.bias)


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def resolve_attention(attention: str | None, dtype, head_dim: int) -> str:
    """An attention implementation: the one given, else the backend's default for these heads.

    None is cuDNN's fused attention on GPUs for bf16/fp16 heads it supports; rfdit's einsum on
    CPUs, which trained the hidden-256 core config 2% faster there than
    `jax.nn.dot_product_attention` and the debug config at the same speed (BENCHMARKS.md); XLA's
    (`jax.nn.dot_product_attention`) otherwise."""
    if attention is not None:
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention (={attention!r}) must be one of {ATTENTION_IMPLEMENTATIONS}, "
                             "or None for the backend's default.")
        return attention
    if jax.default_backend() == "cpu":
        return "einsum"
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn" if head_dim % 8 == 0 and head_dim <= 128 else "xla"
    return "xla"


def einsum_attention(q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"]) -> Float[Array, "n h d"]:
    """softmax(q k^T / sqrt(d)) v per head: the logits accumulate, are scaled and go through the
    softmax in float32; the weights are cast to v's dtype for the second product, whose result is
    float32 on CPUs (see `product`) and v's dtype elsewhere, and comes back in v's dtype."""
    return _einsum_attention_forward(q, k, v)[0]


def _einsum_attention_forward(q, k, v):
    """`einsum_attention`'s output, and the weights (softmax) in v's dtype."""
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out_dtype = jnp.float32 if _bf16_products_write_float32() else v.dtype  # see `product`
    return jnp.einsum("hqk,khd->qhd", weights, v, preferred_element_type=out_dtype).astype(v.dtype), weights


@jax.custom_vjp
def _packed_attention_bf16_backward(qkv: Float[Array, "n 3 h d"]) -> Float[Array, "n h d"]:
    """`einsum_attention` on bf16 heads packed as q, k, v along qkv's second axis (the qkv layer's
    output), whose backward pass multiplies bf16 operands into float32 (the output's cotangent and
    the logits' gradient rounded to bf16), as `_bf16_linear_bf16_backward` does for the linear
    layers. Autodiff would multiply float32 cotangents by bf16 operands, at the float32 rate, and
    XLA's CPU backend would slice and concatenate the bf16 heads through float32: 2.3 ms against 0.87
    per forward and backward pass for the debug config's heads on a 2-core CPU
    (experiments/bench_products.py). The three gradients come back packed, rounded to bf16 once."""
    return einsum_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])


def _attention_fwd(qkv):
    out, weights = _einsum_attention_forward(qkv[:, 0], qkv[:, 1], qkv[:, 2])
    return out, (qkv, weights)


def _attention_bwd(residuals, g):
    qkv, weights = residuals  # weights: the softmax in bf16, as the forward product used it
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    gb = g.astype(v.dtype)
    dv = jnp.einsum("hqk,qhd->khd", weights, gb, preferred_element_type=jnp.float32)
    d_weights = jnp.einsum("qhd,khd->hqk", gb, v, preferred_element_type=jnp.float32)
    p = weights.astype(jnp.float32)
    d_logits = p * (d_weights - jnp.sum(d_weights * p, axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
    d_logits = d_logits.astype(q.dtype)
    dq = jnp.einsum("hqk,khd->qhd", d_logits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("hqk,qhd->khd", d_logits, q, preferred_element_type=jnp.float32)
    return (jnp.stack([dq, dk, dv], axis=1).astype(qkv.dtype),)


_packed_attention_bf16_backward.defvjp(_attention_fwd, _attention_bwd)


def _packed_bf16_backward(chosen: str, dtypes, bf16_backward: bool) -> bool:
    """Whether attention runs as `_packed_attention_bf16_backward`: the einsum on bf16 heads on CPUs,
    with `bf16_backward`."""
    return (bf16_backward and chosen == "einsum" and _bf16_products_write_float32()
            and all(dtype == jnp.bfloat16 for dtype in dtypes))


def qkv_attention(
    qkv: Float[Array, "n 3 h d"], implementation: str | None = None, *, bf16_backward: bool = False
) -> Float[Array, "n h d"]:
    """`attention` on q, k, v packed along qkv's second axis, as the qkv layer writes them; the einsum
    on bf16 heads on CPUs with `bf16_backward` takes them packed (`_packed_attention_bf16_backward`)."""
    chosen = resolve_attention(implementation, qkv.dtype, qkv.shape[-1])
    if _packed_bf16_backward(chosen, [qkv.dtype], bf16_backward):
        return _packed_attention_bf16_backward(qkv)
    return attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], implementation, bf16_backward=bf16_backward)


def attention(
    q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"], implementation: str | None = None,
    *, bf16_backward: bool = False,
) -> Float[Array, "n h d"]:
    """Softmax attention over one example's tokens (`resolve_attention`). A default cuDNN attention
    that does not apply to these shapes or this build falls back to XLA's; one asked for raises.
    `bf16_backward` gives the einsum on bf16 heads on CPUs a backward pass in bf16 operands
    (`_packed_attention_bf16_backward`; see `with_bf16_backward`)."""
    chosen = resolve_attention(implementation, q.dtype, q.shape[-1])
    if _packed_bf16_backward(chosen, [q.dtype, k.dtype, v.dtype], bf16_backward):
        return _packed_attention_bf16_backward(jnp.stack([q, k, v], axis=1))
    if chosen == "einsum":
        return einsum_attention(q, k, v)
    with jax.numpy_dtype_promotion("standard"):  # jax's XLA attention promotes bf16 logits to f32
        if chosen == "cudnn" and implementation is None:
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                chosen = "xla"
        return jax.nn.dot_product_attention(q, k, v, implementation=chosen)


class DiTBlock(eqx.Module):
    """A transformer block with adaLN-Zero conditioning."""

    qkv: Linear
    proj: Linear
    fc1: Linear
    fc2: Linear
    modulation: Linear
    q_norm: LayerNorm | None
    k_norm: LayerNorm | None
    num_heads: int = eqx.field(static=True)

    def __init__(self, cfg: DiTConfig, *, key: PRNGKeyArray, dtype: str = "float32"):
        h, w = cfg.hidden_size, cfg.mlp_width
        qkv_key, proj_key, fc1_key, fc2_key = jr.split(key, 4)
        self.qkv = _xavier(qkv_key, 3 * h, h, dtype)
        self.proj = _xavier(proj_key, h, h, dtype)
        self.fc1 = _xavier(fc1_key, w, h, dtype)
        self.fc2 = _xavier(fc2_key, h, w, dtype)
        self.modulation = _zeros(6 * h, h, dtype)  # adaLN-Zero: every block starts as the identity
        head_dim = h // cfg.num_heads
        if cfg.qk_norm:
            self.q_norm = LayerNorm(jnp.ones((head_dim,)), jnp.zeros((head_dim,)))
            self.k_norm = LayerNorm(jnp.ones((head_dim,)), jnp.zeros((head_dim,)))
        else:
            self.q_norm = self.k_norm = None
        self.num_heads = cfg.num_heads

    def __call__(
        self, x: Float[Array, "n d"], c: Float[Array, " d"], *, attention_implementation: str | None = None
    ) -> Float[Array, "n d"]:
        n, d = x.shape
        # shift/scale/gate for attention, then for the MLP
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(self.modulation(jax.nn.silu(c)), 6)

        # Results that go to elementwise ops (the GELU, the gated residuals) stay in the products'
        # output dtype: float32 on CPUs, where XLA rounds every bf16 elementwise op through float32
        # (a tanh-GELU in bf16 is a dozen converts), and the compute dtype elsewhere. qkv's go to
        # attention's products, in the compute dtype.
        wide = "float32" if _bf16_products_write_float32() else self.fc1.dtype
        h = _modulate(_layer_norm(x), shift_a, scale_a)  # (n, d)
        qkv = self.qkv(h, out_dtype=self.qkv.dtype)  # (n, 3d) in the compute dtype
        qkv = qkv.reshape(n, 3, self.num_heads, d // self.num_heads)  # q, k, v: (n, heads, head_dim) each
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(qkv[:, 0].astype(jnp.float32)), self.k_norm(qkv[:, 1].astype(jnp.float32))
            qkv = jnp.stack([q.astype(qkv.dtype), k.astype(qkv.dtype), qkv[:, 2]], axis=1)
        # (n, heads, head_dim); its backward pass in bf16 operands when the block's products have one
        attn = qkv_attention(qkv, attention_implementation, bf16_backward=self.qkv.bf16_backward)
        x = _gated_residual(x, gate_a, self.proj(attn.reshape(n, d), out_dtype=wide))

        h = _modulate(_layer_norm(x), shift_m, scale_m)
        h = self.fc2(jax.nn.gelu(self.fc1(h, out_dtype=wide), approximate=True), out_dtype=wide)
        return _gated_residual(x, gate_m, h)


class PatchEmbed(eqx.Module):
    """Non-overlapping patches (stride = kernel = patch) projected to the width.

    `weight` is laid out (hidden, p, p, C), i.e. a PyTorch conv kernel (O, I, kh, kw)
    transposed to (O, kh, kw, I).
    """

    weight: Float[Array, "d p q c"]
    bias: Float[Array, " d"]
    patch_size: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True, default="float32")
    bf16_backward: bool = eqx.field(static=True, default=False)

    def __call__(self, x: Float[Array, "H W C"]) -> Float[Array, "n d"]:
        p = self.patch_size
        height, width, channels = x.shape
        patches = x.reshape(height // p, p, width // p, p, channels).transpose(0, 2, 1, 3, 4)
        patches = patches.reshape(-1, p * p * channels)  # (n, p*p*C), row-major over (h, w)
        w = self.weight.reshape(self.weight.shape[0], -1)
        if self.bf16_backward and jnp.dtype(self.dtype) == jnp.bfloat16 and _bf16_products_write_float32():
            y = _patch_product_bf16(patches, w, str(patches.dtype))
        else:
            y = product(patches, w, self.dtype)  # see Linear
        return _add_bias(y, self.bias).astype(x.dtype)


class DiT(eqx.Module):
    """DiT with adaLN-Zero blocks, class-conditional with a null label for guidance."""

    patch_embed: PatchEmbed
    t_fc1: Linear
    t_fc2: Linear
    label_table: Float[Array, "k1 d"]
    blocks: DiTBlock  # stacked: every array has a leading `depth` axis
    final_modulation: Linear
    final_linear: Linear
    config: DiTConfig = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    scan_unroll: int = eqx.field(static=True)
    attention: str | None = eqx.field(static=True)
    residual_dtype: str = eqx.field(static=True)

    def __init__(
        self, config: DiTConfig, *, key: PRNGKeyArray, dtype: str = "float32", remat: bool | str | None = None,
        scan_unroll: int | None = None, attention: str | None = None, residual_dtype: str = "float32",
    ):
        """`dtype` is the matmul compute dtype (parameters are always float32).

        `remat` chooses what each block keeps for the backward pass: "none" keeps every
        activation; "dots" keeps only the outputs of the linear layers and recomputes the
        rest (LayerNorm, modulation, attention, GELU), which is less memory and, for float32 on
        CPUs, faster (BENCHMARKS.md); "full" keeps only the block's input (least memory, about a
        third more compute). True and False mean "full" and "none"; None (the default) is
        "dots" for float32 on CPUs and "none" otherwise (`resolve_remat`).

        `scan_unroll` unrolls that many blocks per scan iteration; None (the default) is 1 for
        float32 on CPUs and the full depth otherwise (`resolve_scan_unroll`).

        `attention` is one of ATTENTION_IMPLEMENTATIONS ("einsum", "xla", "cudnn"); None (the
        default) is the backend's choice when the model runs (`resolve_attention`).

        `residual_dtype` is the dtype of the residual stream between and inside the blocks (the
        tokens, LayerNorm's and the modulation's outputs): "float32" (the default, as under
        PyTorch's autocast) or "bfloat16", which halves the bytes that the elementwise work and the
        reductions between the products move. LayerNorm's statistics, the softmax and every
        gradient sum of the conditioning stay float32 either way. It is independent of `dtype`,
        though only bf16 products make it pay (BENCHMARKS.md)."""
        for name, value in (("compute dtype", dtype), ("residual_dtype", residual_dtype)):
            if value not in ("float32", "bfloat16"):
                raise ValueError(f"{name} (={value!r}) must be 'float32' or 'bfloat16'.")
        remat = resolve_remat(remat, dtype)
        if attention is not None:
            resolve_attention(attention, dtype, config.hidden_size // config.num_heads)  # a bad name fails here
        cfg = config
        h, p = cfg.hidden_size, cfg.patch_size
        patch_key, t1_key, t2_key, label_key, blocks_key = jr.split(key, 5)
        fan_in, fan_out = cfg.in_channels * p * p, h
        limit = math.sqrt(6.0 / (fan_in + fan_out))  # xavier on the flattened kernel, as DiT
        self.patch_embed = PatchEmbed(
            jr.uniform(patch_key, (h, p, p, cfg.in_channels), minval=-limit, maxval=limit), jnp.zeros((h,)), p, dtype
        )
        self.t_fc1 = _normal(t1_key, h, NUM_FREQUENCIES, dtype)
        self.t_fc2 = _normal(t2_key, h, h, dtype)
        self.label_table = 0.02 * jr.normal(label_key, (cfg.num_classes + 1, h))
        self.blocks = eqx.filter_vmap(lambda k: DiTBlock(cfg, key=k, dtype=dtype))(jr.split(blocks_key, cfg.depth))
        self.final_modulation = _zeros(2 * h, h, dtype)
        self.final_linear = _zeros(p * p * cfg.out_channels, h, dtype)
        self.config = cfg
        self.remat = remat
        self.scan_unroll = resolve_scan_unroll(scan_unroll, cfg.depth, dtype=dtype)
        self.attention = attention
        self.residual_dtype = residual_dtype

    def embed(self, t: Float[Array, ""], y: Int[Array, ""]) -> Float[Array, " d"]:
        """The conditioning vector c = timestep embedding + label embedding."""
        t = t * self.config.time_scale if self.config.t_conditioning else jnp.zeros_like(t)
        t_emb = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t))))
        return t_emb + self.label_table[y]

    def __call__(
        self, x: Float[Array, "H W C"], t: Float[Array, ""], y: Int[Array, ""], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "H W O"]:
        cfg = self.config
        if x.shape != (cfg.image_size, cfg.image_size, cfg.in_channels):
            raise ValueError(
                f"DiT expects one example of shape {(cfg.image_size, cfg.image_size, cfg.in_channels)} "
                f"(H, W, C); got {x.shape}. Batch with jax.vmap."
            )
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        tokens = (self.patch_embed(x) + sincos_pos_embed(cfg.hidden_size, grid)).astype(self.residual_dtype)  # (n, d)
        c = self.embed(t, y)  # (d,)

        block_arrays, block_static = eqx.partition(self.blocks, eqx.is_array)

        def run_block(tokens, arrays):
            return eqx.combine(arrays, block_static)(tokens, c, attention_implementation=self.attention), None

        if self.remat != "none":
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[self.remat])

        tokens, _ = jax.lax.scan(run_block, tokens, block_arrays, unroll=self.scan_unroll)  # (n, d)

        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c)), 2)
        out = self.final_linear(_modulate(_layer_norm(tokens), shift, scale))  # (n, p*p*O)
        out = out.reshape(grid, grid, p, p, cfg.out_channels).transpose(0, 2, 1, 3, 4)
        return out.reshape(cfg.image_size, cfg.image_size, cfg.out_channels).astype(x.dtype)


def with_compute_dtype(
    model: DiT, dtype: str, remat: bool | str | None = None, scan_unroll: int | None = None,
    attention: str | None = None, residual_dtype: str | None = None,
) -> DiT:
    """The same weights, with matmuls computed in `dtype` ("float32" or "bfloat16") and,
    when given, block rematerialisation, scan unrolling, the attention implementation and the
    residual stream's dtype changed. Those not given are kept as `model` has them, even where the
    new dtype's defaults differ (`resolve_remat`, `resolve_scan_unroll`)."""
    remat = model.remat if remat is None else remat
    scan_unroll = model.scan_unroll if scan_unroll is None else scan_unroll
    attention = model.attention if attention is None else attention
    residual_dtype = model.residual_dtype if residual_dtype is None else residual_dtype
    skeleton = eqx.filter_eval_shape(
        lambda: DiT(model.config, key=jr.key(0), dtype=dtype, remat=remat, scan_unroll=scan_unroll, attention=attention,
                    residual_dtype=residual_dtype)
    )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(skeleton), jax.tree_util.tree_leaves(model))


def with_bf16_backward(model: eqx.Module) -> eqx.Module:
    """`model` with the backward pass of its bf16 products in bf16 operands as well, for
    a training loss over a batch: `rfdit.TrainStep` differentiates this. It changes nothing in float32
    or off CPUs. On CPUs it rules out forward-mode autodiff (jvp, linearize) of the model it returns,
    and per-example gradients of a weight or bias shared by the batch (jax.vmap of jax.grad,
    jax.jacrev), which would come out summed over the batch (`_outer_sum_vmap`, `_leading_sum_vmap`).
    The linear layers get `_bf16_linear_bf16_backward`, the patch embedding `_patch_product_bf16`,
    and a block's einsum attention follows its qkv layer's flag (`_packed_attention_bf16_backward`)."""
    def flag(m):
        if not isinstance(m, (Linear, PatchEmbed)):
            return m
        # a copy without __init__, whose shape checks would reject the blocks' stacked weights
        flagged = object.__new__(type(m))
        for field in dataclasses.fields(m):
            object.__setattr__(flagged, field.name, True if field.name == "bf16_backward" else getattr(m, field.name))
        return flagged

    return jax.tree_util.tree_map(flag, model, is_leaf=lambda m: isinstance(m, (Linear, PatchEmbed)))


def count_params(model: eqx.Module) -> int:
    """Number of trainable scalars (the position table is a constant, not a parameter)."""
    def is_param(x):  # arrays, or their shapes under eval_shape
        return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model) if is_param(x))
