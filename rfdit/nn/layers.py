"""The layers the DiT (and the VAE's attention) are built from, one example per call.

Layers hold parameters only; how their products run (dtype, CPU backward rules, attention
implementation) comes from the `ExecutionPolicy` the caller passes.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from . import grad_rules
from .grad_rules import add_bias
from .policy import ExecutionPolicy

_FLOAT32 = ExecutionPolicy(products_write_float32=False)  # a float32 policy is the same on every backend


def layer_norm(
    x: Float[Array, "... d"], policy: ExecutionPolicy = _FLOAT32, eps: float = 1e-6
) -> Float[Array, "... d"]:
    """Parameter-free LayerNorm over the last axis, computed in float32, returned in x's dtype.

    The variance is E[(x - E[x])²], except in the CPU training step (`policy.cpu_training_rules`), where
    it is E[x²] - E[x]² (Flax's default): both statistics come from one pass, and the backward pass,
    which remat "dots" makes recompute them, is shorter (BENCHMARKS.md, "CPU: one-pass LayerNorm in the
    training step"). Its rounding error grows with E[x]²/var: within 3e-6 of float64 at a mean of three
    standard deviations."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    if policy.cpu_training_rules:
        var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    else:
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _broadcast_like(v: Float[Array, " d"], x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    # Broadcast before the cast, so that the backward pass casts the cotangent up before summing it
    # (for v that varies per example: under vmap, an unbatched v's broadcast would come after the cast).
    return jnp.broadcast_to(v, x.shape).astype(x.dtype)


def modulate(x: Float[Array, "n d"], shift: Float[Array, " d"], scale: Float[Array, " d"]) -> Float[Array, "n d"]:
    """x·(1 + scale) + shift in x's dtype, written x + x·scale + shift: in bf16, 1 + scale would round
    small scales away (adaLN-Zero starts them at 0). The conditioning's gradients sum in float32."""
    return x + x * _broadcast_like(scale, x) + _broadcast_like(shift, x)


def gated_residual(x: Float[Array, "n d"], gate: Float[Array, " d"], h: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """x + gate·h in x's dtype; the gate's gradient sums in float32."""
    return x + _broadcast_like(gate, x) * h.astype(x.dtype)


def product(x: Float[Array, "... i"], weight: Float[Array, "o i"], policy: ExecutionPolicy) -> Float[Array, "... o"]:
    """x W^T with operands in the policy's compute dtype, accumulated in float32. bf16 products write
    float32 where `policy.products_write_float32` (CPUs) and bf16 elsewhere, where a bf16 result keeps
    the backward pass's products bf16 too."""
    if policy.bf16 and policy.products_write_float32:
        return grad_rules.bf16_product(x, weight)
    dtype = jnp.dtype(policy.compute_dtype)
    return jnp.matmul(x.astype(dtype), weight.T.astype(dtype), preferred_element_type=dtype)


class Linear(eqx.Module):
    """y = x W^T + b."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]

    def __call__(
        self, x: Float[Array, "... in"], policy: ExecutionPolicy = _FLOAT32, *, out_dtype: str | None = None
    ) -> Float[Array, "... out"]:
        """Arguments:
            x: inputs, any leading axes.
            policy: how the product runs (`product`).
            out_dtype: the result's dtype; by default x's.

        Returns:
            (..., out) in `out_dtype`.
        """
        out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
        if policy.bf16_cpu_backward:
            return grad_rules.bf16_linear(x, self.weight, self.bias, str(x.dtype), str(self.weight.dtype),
                                          str(out_dtype))
        return add_bias(product(x, self.weight, policy), self.bias).astype(out_dtype)


def xavier_linear(key: PRNGKeyArray, out_features: int, in_features: int) -> Linear:
    """A Linear with Xavier-uniform weights and a zero bias (DiT's init)."""
    limit = math.sqrt(6.0 / (in_features + out_features))
    return Linear(jr.uniform(key, (out_features, in_features), minval=-limit, maxval=limit), jnp.zeros((out_features,)))


def normal_linear(key: PRNGKeyArray, out_features: int, in_features: int, std: float = 0.02) -> Linear:
    """A Linear with N(0, std²) weights and a zero bias."""
    return Linear(std * jr.normal(key, (out_features, in_features)), jnp.zeros((out_features,)))


def zero_linear(out_features: int, in_features: int) -> Linear:
    """A Linear that outputs zeros (adaLN-Zero's modulation and the final layer)."""
    return Linear(jnp.zeros((out_features, in_features)), jnp.zeros((out_features,)))


class LayerNorm(eqx.Module):
    """LayerNorm with an affine transform (the optional q/k norm). eps is PyTorch's default, 1e-5, as
    timm's q/k norm in REPA uses it."""

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True, default=1e-5)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return add_bias(layer_norm(x, eps=self.eps) * self.weight.reshape((1,) * (x.ndim - 1) + self.weight.shape),
                        self.bias)


class PatchEmbed(eqx.Module):
    """Non-overlapping patches (stride = kernel = patch) projected to the width.

    `weight` is laid out (hidden, p, p, C): a PyTorch conv kernel (O, I, kh, kw) transposed to (O, kh, kw, I).
    """

    weight: Float[Array, "d p q c"]
    bias: Float[Array, " d"]
    patch_size: int = eqx.field(static=True)

    def __call__(self, x: Float[Array, "H W C"], policy: ExecutionPolicy = _FLOAT32) -> Float[Array, "n d"]:
        """Arguments:
            x: one image (H, W, C), H and W divisible by the patch size.
            policy: how the product runs (`product`).

        Returns:
            (H/p · W/p, hidden) tokens, row-major over the patch grid, in x's dtype.
        """
        p = self.patch_size
        height, width, channels = x.shape
        patches = x.reshape(height // p, p, width // p, p, channels).transpose(0, 2, 1, 3, 4)
        patches = patches.reshape(-1, p * p * channels)  # (n, p*p*C), row-major over (h, w)
        w = self.weight.reshape(self.weight.shape[0], -1)
        if policy.cpu_training_rules:
            y = grad_rules.patch_product(patches, w, policy.compute_dtype, str(patches.dtype))
        else:
            y = product(patches, w, policy)
        return add_bias(y, self.bias).astype(x.dtype)


def einsum_attention(
    q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"], policy: ExecutionPolicy = _FLOAT32
) -> Float[Array, "n h d"]:
    """softmax(q k^T / sqrt(d)) v per head, with float32 logits and softmax; the second product writes
    float32 where bf16 products do (`product`) and v's dtype elsewhere. Returns v's dtype."""
    out_dtype = jnp.float32 if policy.products_write_float32 else v.dtype
    return grad_rules.softmax_attention(q, k, v, out_dtype)[0]


def _packed_backward(implementation: str, dtypes, policy: ExecutionPolicy) -> bool:
    """Whether attention takes `grad_rules.packed_attention`: the einsum attention in a CPU training step
    (`policy.cpu_training_rules`), on heads of one dtype, float32 or bf16."""
    return (implementation == "einsum" and policy.cpu_training_rules and len(set(dtypes)) == 1
            and jnp.dtype(dtypes[0]) in (jnp.float32, jnp.bfloat16))


def attention(
    q: Float[Array, "n h d"], k: Float[Array, "n h d"], v: Float[Array, "n h d"], policy: ExecutionPolicy = _FLOAT32
) -> Float[Array, "n h d"]:
    """Softmax attention over one example's tokens, by `policy.attention_for` these heads. A default
    cuDNN attention that does not apply to these shapes or this build falls back to XLA's; one asked
    for raises."""
    chosen = policy.attention_for(q.dtype, q.shape[-1])
    if _packed_backward(chosen, [q.dtype, k.dtype, v.dtype], policy):
        return grad_rules.packed_attention(jnp.stack([q, k, v], axis=1))
    if chosen == "einsum":
        return einsum_attention(q, k, v, policy)
    with jax.numpy_dtype_promotion("standard"):  # jax's XLA attention promotes bf16 logits to f32
        if chosen == "cudnn" and policy.attention is None:
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                chosen = "xla"
        return jax.nn.dot_product_attention(q, k, v, implementation=chosen)


def qkv_attention(qkv: Float[Array, "n 3 h d"], policy: ExecutionPolicy = _FLOAT32) -> Float[Array, "n h d"]:
    """`attention` on q, k, v packed along qkv's second axis, as a qkv layer writes them."""
    if _packed_backward(policy.attention_for(qkv.dtype, qkv.shape[-1]), [qkv.dtype], policy):
        return grad_rules.packed_attention(qkv)
    return attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], policy)


def count_params(model: eqx.Module) -> int:
    """Number of trainable scalars (the position table is a constant, not a parameter)."""
    def is_param(x):  # arrays, or their shapes under eval_shape
        return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model) if is_param(x))
