"""The Diffusion Transformer (Peebles & Xie, 2023) as Equinox modules, channels-last.

One example per call: `DiT(cfg, key=...)(x, t, y)` maps x (H, W, C), t () and y () to
(H, W, out_channels). Batches go through `jax.vmap`. How the arithmetic runs (dtypes, remat, scan
unrolling, attention) is the model's `policy` (`rfdit.nn.policy`); the layers are in `rfdit.nn.layers`.
"""

from __future__ import annotations

import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..config import DiTConfig
from .layers import (
    LayerNorm, Linear, PatchEmbed, gated_residual, layer_norm, modulate, normal_linear, qkv_attention, xavier_linear,
    zero_linear,
)
from .policy import REMAT_POLICIES, ExecutionPolicy, resolve_policy

NUM_FREQUENCIES = 256


def sincos_pos_embed(hidden_size: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position table, (grid_size², hidden_size), float32.

    The first half of the features encodes the column (w) index and the second half the row (h)
    index, as in MAE/DiT, so published tables compare equal.
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

    def __init__(self, cfg: DiTConfig, *, key: PRNGKeyArray):
        h, w = cfg.hidden_size, cfg.mlp_width
        qkv_key, proj_key, fc1_key, fc2_key = jr.split(key, 4)
        self.qkv = xavier_linear(qkv_key, 3 * h, h)
        self.proj = xavier_linear(proj_key, h, h)
        self.fc1 = xavier_linear(fc1_key, w, h)
        self.fc2 = xavier_linear(fc2_key, h, w)
        self.modulation = zero_linear(6 * h, h)  # adaLN-Zero: every block starts as the identity
        head_dim = h // cfg.num_heads
        if cfg.qk_norm:
            self.q_norm = LayerNorm(jnp.ones((head_dim,)), jnp.zeros((head_dim,)))
            self.k_norm = LayerNorm(jnp.ones((head_dim,)), jnp.zeros((head_dim,)))
        else:
            self.q_norm = self.k_norm = None
        self.num_heads = cfg.num_heads

    def __call__(
        self, x: Float[Array, "n d"], c: Float[Array, " d"], policy: ExecutionPolicy
    ) -> Float[Array, "n d"]:
        """Arguments:
            x: the tokens (n, d) in the residual dtype.
            c: the conditioning vector (d,).
            policy: how the products and attention run.

        Returns:
            The tokens (n, d) in x's dtype.
        """
        n, d = x.shape
        heads = self.num_heads
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(self.modulation(jax.nn.silu(c), policy), 6)
        wide = policy.wide_dtype  # results that go on to elementwise work (GELU, gated residuals)

        h = modulate(layer_norm(x, policy), shift_a, scale_a)  # (n, d)
        qkv = self.qkv(h, policy, out_dtype=policy.compute_dtype)  # (n, 3d)
        qkv = qkv.reshape(n, 3, heads, d // heads)  # (n, 3, heads, head_dim): q, k, v
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(qkv[:, 0].astype(jnp.float32)), self.k_norm(qkv[:, 1].astype(jnp.float32))
            qkv = jnp.stack([q.astype(qkv.dtype), k.astype(qkv.dtype), qkv[:, 2]], axis=1)
        attn = qkv_attention(qkv, policy)  # (n, heads, head_dim)
        x = gated_residual(x, gate_a, self.proj(attn.reshape(n, d), policy, out_dtype=wide))  # (n, d)

        h = modulate(layer_norm(x, policy), shift_m, scale_m)  # (n, d)
        h = jax.nn.gelu(self.fc1(h, policy, out_dtype=wide), approximate=True)  # (n, mlp_width)
        h = self.fc2(h, policy, out_dtype=wide)  # (n, d)
        return gated_residual(x, gate_m, h)


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
    policy: ExecutionPolicy = eqx.field(static=True)

    def __init__(
        self,
        config: DiTConfig,
        *,
        key: PRNGKeyArray,
        policy: ExecutionPolicy | None = None,
        dtype: str = "float32",
        remat: bool | str | None = None,
        scan_unroll: int | None = None,
        attention: str | None = None,
        residual_dtype: str = "float32",
    ):
        """Arguments:
            config: the architecture.
            key: initialises the parameters (always float32).
            policy: how the model runs (`ExecutionPolicy`). Without it, one is resolved for this
                backend from the shorthand below (`resolve_policy`): `dtype` is the products'
                compute dtype, `remat` what a block keeps for the backward pass ("none", "dots",
                "full"; True and False mean "full" and "none"), `scan_unroll` blocks per scan
                iteration, `attention` "einsum", "xla" or "cudnn", `residual_dtype` the tokens'
                dtype between the products. None means the backend's default.
        """
        if policy is None:
            policy = resolve_policy(config.depth, compute_dtype=dtype, residual_dtype=residual_dtype, remat=remat,
                                    scan_unroll=scan_unroll, attention=attention)
        cfg = config
        h, p = cfg.hidden_size, cfg.patch_size
        patch_key, t1_key, t2_key, label_key, blocks_key = jr.split(key, 5)
        fan_in = cfg.in_channels * p * p
        limit = math.sqrt(6.0 / (fan_in + h))  # xavier on the flattened kernel, as DiT
        patch_weight = jr.uniform(patch_key, (h, p, p, cfg.in_channels), minval=-limit, maxval=limit)
        self.patch_embed = PatchEmbed(patch_weight, jnp.zeros((h,)), p)
        self.t_fc1 = normal_linear(t1_key, h, NUM_FREQUENCIES)
        self.t_fc2 = normal_linear(t2_key, h, h)
        self.label_table = 0.02 * jr.normal(label_key, (cfg.num_classes + 1, h))
        self.blocks = eqx.filter_vmap(lambda k: DiTBlock(cfg, key=k))(jr.split(blocks_key, cfg.depth))
        self.final_modulation = zero_linear(2 * h, h)
        self.final_linear = zero_linear(p * p * cfg.out_channels, h)
        self.config = cfg
        self.policy = policy

    def embed(self, t: Float[Array, ""], y: Int[Array, ""]) -> Float[Array, " d"]:
        """The conditioning vector c = timestep embedding + label embedding."""
        t = t * self.config.time_scale if self.config.t_conditioning else jnp.zeros_like(t)
        t_emb = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t), self.policy)), self.policy)
        return t_emb + self.label_table[y]

    def __call__(
        self, x: Float[Array, "H W C"], t: Float[Array, ""], y: Int[Array, ""], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "H W O"]:
        """Arguments:
            x: one example (H, W, C); batches go through jax.vmap.
            t: the time, 0 (noise) to 1 (data).
            y: the label; `num_classes` is the null label.

        Returns:
            The velocity (H, W, out_channels) in x's dtype.
        """
        cfg, policy = self.config, self.policy
        if x.shape != (cfg.image_size, cfg.image_size, cfg.in_channels):
            raise ValueError(
                f"DiT expects one example of shape {(cfg.image_size, cfg.image_size, cfg.in_channels)} "
                f"(H, W, C); got {x.shape}. Batch with jax.vmap."
            )
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        tokens = self.patch_embed(x, policy) + sincos_pos_embed(cfg.hidden_size, grid)  # (n, d), n = grid²
        tokens = tokens.astype(policy.residual_dtype)
        c = self.embed(t, y)  # (d,)

        block_arrays, block_static = eqx.partition(self.blocks, eqx.is_array)

        def run_block(tokens, arrays):  # (n, d) -> (n, d)
            return eqx.combine(arrays, block_static)(tokens, c, policy), None

        if policy.remat != "none":
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[policy.remat])
        tokens, _ = jax.lax.scan(run_block, tokens, block_arrays, unroll=policy.scan_unroll)  # (n, d)

        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c), policy), 2)  # (d,) each
        out = self.final_linear(modulate(layer_norm(tokens, policy), shift, scale), policy)  # (n, p*p*O)
        out = out.reshape(grid, grid, p, p, cfg.out_channels).transpose(0, 2, 1, 3, 4)  # (grid, p, grid, p, O)
        return out.reshape(cfg.image_size, cfg.image_size, cfg.out_channels).astype(x.dtype)


@ft.lru_cache(maxsize=64)
def _structure(config: DiTConfig, policy: ExecutionPolicy) -> jax.tree_util.PyTreeDef:
    return jax.tree_util.tree_structure(eqx.filter_eval_shape(DiT, config, key=jr.key(0), policy=policy))


def with_policy(model: DiT, policy: ExecutionPolicy | None = None, **changes) -> DiT:
    """The same weights run under another execution policy: `policy`, or the model's own with
    `changes` applied (e.g. `with_policy(model, compute_dtype="bfloat16", remat="none")`). Settings not
    named keep the model's values, even where another dtype's defaults differ."""
    policy = (model.policy if policy is None else policy).replace(**changes)
    return jax.tree_util.tree_unflatten(_structure(model.config, policy), jax.tree_util.tree_leaves(model))
