"""Custom differentiation rules of the layers: what autodiff would do, done in fewer passes or in
better-rounded sums. The model's code does not call them directly; `rfdit.nn.layers` does.

On every backend:
- `add_bias` (custom JVP): a bias added in the activations' dtype whose gradient is summed in
  float32 over batch and tokens. In bf16 a plain cast-and-add summed the batch after the cast, ~1% off;
  adding in float32 instead kept XLA from fusing the adds on an H100 (1% slower per DiT-B/2 step with
  the float32 residual stream, 8% with the bf16 one; BENCHMARKS.md, "Execution defaults").

Only on CPUs, only for bf16 products and only in the training step (`ExecutionPolicy.bf16_backward`):
- `bf16_linear` (custom VJP): the linear layer whose backward pass multiplies bf16 operands into
  float32, as the forward pass does. Autodiff multiplies the float32 cotangent by bf16 operands, which
  XLA runs as float32 products, at half the rate on CPUs with AVX512-BF16 or AMX.
- `outer_sum` and `leading_sum` (custom vmap): the weight and bias gradients of those rules, one
  product or sum over batch and tokens instead of one per example summed afterwards.
They pay on CPUs with bf16 dot products (AVX512-BF16, AMX): BENCHMARKS.md, "Execution defaults".

On CPUs, in the training step, in float32 and bf16 alike (`ExecutionPolicy.cpu_training_rules`):
- `packed_attention` (custom VJP): attention on q, k, v packed as the qkv layer writes them, with a
  hand-written backward pass in the heads' dtype (bf16 operands for bf16 heads) that returns the three
  gradients packed. Autodiff's form slices the packed heads and stacks their gradients through copies:
  the float32 debug step ran 3% faster with this rule (BENCHMARKS.md, "CPU: float32 packed attention").
- `patch_product` (custom VJP): the patch embedding's product, whose weight gradient transposes
  the narrow patches rather than the cotangent. With autodiff's form XLA fused the residual stream's
  whole gradient into that strided copy: 22 of a float32 debug step's 97 ms (one core) with every
  activation kept, 8.7 of 23 ms in bf16 (BENCHMARKS.md, "CPU: float32 against the original, profiled").
The third rule of the CPU training step, LayerNorm's one-pass statistics, is a formula rather than a
custom rule, so it lives in `rfdit.nn.layers.layer_norm`.
"""

from __future__ import annotations

import functools as ft
import math

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

# --- every backend -------------------------------------------------------------------------------


@jax.custom_jvp
def add_bias(y: Float[Array, "... d"], bias: Float[Array, " d"]) -> Float[Array, "... d"]:
    """y + bias in y's dtype; the bias gradient is summed in float32 over every axis but the last,
    the batch under vmap included."""
    return y + jnp.broadcast_to(bias, y.shape).astype(y.dtype)


def _add_bias_jvp(primals, tangents):
    # The tangent is formed in float32 and cast once, so its transpose casts the cotangent up before
    # summing it; as a plain cast and add, the batch's sum came after the cast under vmap, in bf16.
    (y, bias), (dy, dbias) = primals, tangents
    if isinstance(dbias, SymbolicZero):  # JAX does not call this rule when both tangents are zero
        return add_bias(y, bias), dy
    # Without a tangent for y, zeros that carry y's batch (jnp.zeros_like would be unbatched under
    # vmap), so that the batch's broadcast of dbias still comes before the cast.
    y32 = y.astype(jnp.float32)
    dy32 = jnp.where(True, jnp.float32(0), y32) if isinstance(dy, SymbolicZero) else dy.astype(jnp.float32)
    return add_bias(y, bias), (dy32 + jnp.broadcast_to(dbias.astype(jnp.float32), y.shape)).astype(y.dtype)


add_bias.defjvp(_add_bias_jvp, symbolic_zeros=True)


# --- CPUs, bf16 products ---------------------------------------------------------------------------


def bf16_product(x: Float[Array, "... i"], weight: Float[Array, "o i"]) -> Float[Array, "... o"]:
    """x W^T from bf16 operands into a float32 result."""
    return jnp.matmul(x.astype(jnp.bfloat16), weight.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@custom_vmap
def outer_sum(g: Array, x: Array, weight: Array) -> Float[Array, "o i"]:
    """The sum over every leading axis of g ⊗ x, in float32: the gradient (o, i) of `weight` from the
    output's cotangent (..., o) and the input (..., i). `weight` only says, under vmap, whether each
    example has its own."""
    if g.dtype == jnp.float32 and x.shape[-1] < g.shape[-1]:  # transpose the narrower operand
        return jnp.einsum("...i,...o->io", x, g).T  # (XLA's CPU fallback for dots rejects bf16 here)
    return jnp.einsum("...o,...i->oi", g, x, preferred_element_type=jnp.float32)


@outer_sum.def_vmap
def _outer_sum_vmap(axis_size: int, in_batched: list[bool], g: Array, x: Array, weight: Array):
    g = g if in_batched[0] else jnp.broadcast_to(g, (axis_size, *g.shape))
    x = x if in_batched[1] else jnp.broadcast_to(x, (axis_size, *x.shape))
    if in_batched[2]:  # a weight per example (e.g. models stacked by vmap): a gradient per example
        return jnp.einsum("b...o,b...i->boi", g, x, preferred_element_type=jnp.float32), True
    # One weight for the batch (the loss vmaps the model over examples, inside grad): its gradient sums
    # the batch in the same product, where the custom VJP's batched rule would form one product per
    # example and sum them afterwards (B times the memory). This rule cannot tell that vmap from one
    # outside grad, so per-example gradients of a shared weight (vmap of grad) would come out summed.
    return outer_sum(g, x, weight), False


@custom_vmap
def leading_sum(g: Array, bias: Array) -> Float[Array, " o"]:
    """The sum over every leading axis of g, in float32: the gradient of `bias` from the output's
    cotangent. As in `outer_sum`, a batch sharing one bias sums in the same reduction."""
    return jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))


@leading_sum.def_vmap
def _leading_sum_vmap(axis_size: int, in_batched: list[bool], g: Array, bias: Array):
    g = g if in_batched[0] else jnp.broadcast_to(g, (axis_size, *g.shape))
    if in_batched[1]:  # a bias per example: a gradient per example
        return jnp.sum(g.astype(jnp.float32), axis=tuple(range(1, g.ndim - 1))), True
    return leading_sum(g, bias), False


def _biased(y: Float[Array, "... o"], bias: Float[Array, " o"], out_dtype: str) -> Float[Array, "... o"]:
    return (y + jnp.broadcast_to(bias, y.shape)).astype(out_dtype)


@ft.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def bf16_linear(x, weight, bias, x_dtype: str, weight_dtype: str, out_dtype: str):
    """x W^T + b from bf16 operands, added in float32 and cast once to `out_dtype`. The backward pass
    rounds the cotangent to bf16 and multiplies bf16 operands into float32, as under PyTorch's
    autocast; the weight gradient sums the batch in one product (`outer_sum`), the bias gradient in
    one float32 sum (`leading_sum`). The bias and the cast sit inside the rule so that a bf16
    cotangent reaches the products without a float32 round trip."""
    return _biased(bf16_product(x, weight), bias, out_dtype)


def _bf16_linear_fwd(x, weight, bias, x_dtype, weight_dtype, out_dtype):
    xb, wb = x.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    return _biased(bf16_product(xb, wb), bias, out_dtype), (xb, wb, bias)


def _bf16_linear_bwd(x_dtype, weight_dtype, out_dtype, residuals, g):
    xb, wb, bias = residuals  # the bias only tells `leading_sum`, under vmap, whether it is per example
    gb = g.astype(jnp.bfloat16)
    dx = jnp.matmul(gb, wb, preferred_element_type=jnp.float32).astype(x_dtype)
    return dx, outer_sum(gb, xb, wb).astype(weight_dtype), leading_sum(g, bias).astype(bias.dtype)


bf16_linear.defvjp(_bf16_linear_fwd, _bf16_linear_bwd)


@ft.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def patch_product(
    patches: Float[Array, "n k"], weight: Float[Array, "o k"], compute_dtype: str, patches_dtype: str
) -> Float[Array, "n o"]:
    """The patch embedding's product from `compute_dtype` operands into float32, whose weight gradient
    is summed in float32 as (patches^T g)^T (`outer_sum`): the transposed operand is the narrow patches
    (n, p²C), not the cotangent (n, o). At k = p²C the float32 products cost next to nothing. Autodiff
    transposes the cotangent instead, and XLA fuses the residual stream's whole gradient into that copy."""
    dtype = jnp.dtype(compute_dtype)
    return jnp.matmul(patches.astype(dtype), weight.T.astype(dtype), preferred_element_type=jnp.float32)


def _patch_product_fwd(patches, weight, compute_dtype, patches_dtype):
    xc = patches.astype(jnp.dtype(compute_dtype))
    return patch_product(xc, weight, compute_dtype, patches_dtype), (xc, weight)


def _patch_product_bwd(compute_dtype, patches_dtype, residuals, g):
    xc, weight = residuals
    g32 = g.astype(jnp.float32)
    dx = jnp.matmul(g32, weight.astype(jnp.dtype(compute_dtype)).astype(jnp.float32))  # dropped by XLA when unused
    return dx.astype(patches_dtype), outer_sum(g32, xc.astype(jnp.float32), weight).astype(weight.dtype)


patch_product.defvjp(_patch_product_fwd, _patch_product_bwd)


def softmax_attention(
    q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"], out_dtype
) -> tuple[Float[Array, "n h d"], Float[Array, "h n n"]]:
    """softmax(q k^T / sqrt(d)) v per head, and the weights: the logits accumulate, are scaled and go
    through the softmax in float32; the weights are cast to v's dtype for the second product, which
    writes `out_dtype`; the output comes back in v's dtype."""
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("hqk,khd->qhd", weights, v, preferred_element_type=out_dtype).astype(v.dtype), weights


@jax.custom_vjp
def packed_attention(qkv: Float[Array, "n 3 h d"]) -> Float[Array, "n h d"]:
    """`softmax_attention` on heads packed as q, k, v along qkv's second axis, on a CPU (float32
    products); its backward pass multiplies operands of the heads' dtype into float32 (for bf16 heads,
    the output's cotangent and the logits' gradient rounded to bf16) and returns the three gradients
    packed, rounded to the heads' dtype once."""
    return softmax_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], jnp.float32)[0]


def _attention_fwd(qkv):
    out, weights = softmax_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], jnp.float32)
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


packed_attention.defvjp(_attention_fwd, _attention_bwd)
