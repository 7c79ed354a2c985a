"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) as Equinox modules, and a loader for its weights.

`AutoencoderKL` takes one example per call, channels-last: `encode_moments(x)` maps an image (H, W, C) to the
latent distribution's mean and log-variance (h, w, latent_channels); `decode(z)` maps a latent back to an image.
`StableVAE` wraps it for batches (B, H, W, C): jitted `encode` / `encode_distribution` / `decode` on latents that
are already multiplied by the scaling factor, `from_pretrained` for diffusers-format folders and Hub ids, and
`save_pretrained` to write such a folder.

A parameter's pytree path spells its diffusers state-dict key (`encoder.down_blocks.0.resnets.1.conv1.weight`),
which is why a few fields are one-element tuples (`to_out`, `downsamplers`, `upsamplers`): loading and saving walk
the tree with no rename table. Conv kernels are stored HWIO, i.e. PyTorch's (O, I, kh, kw) transposed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..config import _JsonMixin
from ..weights import check_tensors, fill, named_leaves, read_tensors, write_tensors
from .layers import Linear, count_params
from .policy import ExecutionPolicy

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
HUB_IDS = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
COMPUTE_DTYPES = ("float32", "bfloat16")
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before anything else uses it.
LOGVAR_RANGE = (-30.0, 20.0)
GROUP_NORM_EPS = 1e-6

_ENCODER_BLOCK = "DownEncoderBlock2D"
_DECODER_BLOCK = "UpDecoderBlock2D"
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_dtype(dtype: str) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype (={dtype!r}) must be one of {COMPUTE_DTYPES}.")


@dataclass(frozen=True)
class VAEConfig(_JsonMixin):
    """Architecture of a diffusers `AutoencoderKL` (the fields of its config.json that change the model).

    Defaults are diffusers' own, so a config.json that leaves a field out means the same thing here.
    `scaling_factor` (and `shift_factor`, None for the SD VAEs) map the VAE's latents to the ones the flow
    model sees: `(z - shift_factor) * scaling_factor`. `VAEConfig.stable_diffusion()` is the SD 1.x/2.x VAE.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int | tuple[int, ...] = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        # A static field must be hashable: lists (from JSON or a caller) become tuples.
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels is empty; give one channel count per resolution.")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VAEConfig.{name} (={value!r}) must be a positive integer.")
        bad = [c for c in self.block_out_channels if not isinstance(c, int) or c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups (={self.norm_num_groups}) must divide every entry of block_out_channels "
                f"(={self.block_out_channels}); {bad[0]} does not. Change one of them."
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor (={self.scaling_factor}) must be positive.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        return super().from_dict(_normalise(data))

    @classmethod
    def stable_diffusion(cls, **overrides: Any) -> VAEConfig:
        """The VAE of Stable Diffusion 1.x/2.x (`stabilityai/sd-vae-ft-ema`, `-mse`): 83,653,863 parameters."""
        preset = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      norm_num_groups=32, scaling_factor=0.18215, sample_size=256)
        return cls(**{**preset, **overrides})

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: one factor of 2 per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Read a diffusers `AutoencoderKL` config.json (as a dict).

        Keys that don't change the model (`force_upcast`, `_diffusers_version`, `latents_mean`, ...) are ignored;
        block types other than the SD VAE's, or another activation, raise a ValueError.
        """
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(
                f"config.json describes a {class_name!r}, not an 'AutoencoderKL'. Pass the VAE's own folder "
                "(in a full Stable Diffusion pipeline repo that is the `vae` subfolder: subfolder='vae')."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        config_for = cls(**_normalise({name: config[name] for name in names if name in config}))
        num_blocks = len(config_for.block_out_channels)
        for key, block in (("down_block_types", _ENCODER_BLOCK), ("up_block_types", _DECODER_BLOCK)):
            types = list(config.get(key, [block]))
            if len(types) != num_blocks:
                raise ValueError(
                    f"config.json has {len(types)} {key} but {num_blocks} block_out_channels; they must match."
                )
            unsupported = sorted({t for t in types if t != block})
            if unsupported:
                raise ValueError(
                    f"{key} {unsupported} are not supported; rfdit's AutoencoderKL builds only {block!r} blocks "
                    "(those of the Stable Diffusion VAEs)."
                )
        act_fn = config.get("act_fn", "silu")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn (={act_fn!r}) is not supported; the Stable Diffusion VAEs use 'silu'.")
        return config_for

    def to_diffusers_config(self) -> dict[str, Any]:
        """This config as a diffusers `AutoencoderKL` config.json (a dict diffusers can load)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL", **self.to_dict()}
        out["block_out_channels"] = list(self.block_out_channels)
        if isinstance(self.sample_size, tuple):
            out["sample_size"] = list(self.sample_size)
        num_blocks = len(self.block_out_channels)
        out["down_block_types"] = [_ENCODER_BLOCK] * num_blocks
        out["up_block_types"] = [_DECODER_BLOCK] * num_blocks
        out["act_fn"] = "silu"
        return out


def _normalise(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON's lists as tuples and its integral floats as floats, the types VAEConfig's fields declare."""
    out = dict(values)
    for name in ("block_out_channels", "sample_size"):
        if isinstance(out.get(name), list):
            out[name] = tuple(out[name])
    for name in ("scaling_factor", "shift_factor"):
        if isinstance(out.get(name), int) and not isinstance(out.get(name), bool):
            out[name] = float(out[name])
    return out


def _uniform_fan_in(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Float[Array, "..."]:
    # PyTorch's default Conv2d/Linear init (weights and biases alike), so a random rfdit VAE behaves like a
    # random diffusers one: activations keep a sensible scale through the stack.
    bound = 1.0 / math.sqrt(fan_in)
    return jr.uniform(key, shape, minval=-bound, maxval=bound)


def _per_channel(v: Float[Array, " c"], ndim: int) -> Float[Array, "..."]:
    """`v` shaped to broadcast over the last axis of an `ndim`-array (explicitly: rank promotion raises)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _linear(key: PRNGKeyArray, in_features: int, out_features: int) -> Linear:
    weight_key, bias_key = jr.split(key)
    weight = _uniform_fan_in(weight_key, (out_features, in_features), in_features)
    return Linear(weight, _uniform_fan_in(bias_key, (out_features,), in_features))


class Conv2d(eqx.Module):
    """A 2-D convolution of one channels-last example; the kernel is HWIO, computed in `dtype`."""

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
        dtype: str = "float32",
        key: PRNGKeyArray,
    ):
        """`padding` is ((top, bottom), (left, right)); by default `kernel_size // 2` on every side."""
        weight_key, bias_key = jr.split(key)
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = _uniform_fan_in(weight_key, (kernel_size, kernel_size, in_channels, out_channels), fan_in)
        self.bias = _uniform_fan_in(bias_key, (out_channels,), fan_in)
        self.stride = stride
        pad = kernel_size // 2
        self.padding = ((pad, pad), (pad, pad)) if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: Float[Array, "H W cin"]) -> Float[Array, "h w cout"]:
        dtype = jnp.dtype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x[None].astype(dtype),
            self.weight.astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )[0]  # (h, w, cout)
        return (y + _per_channel(self.bias, y.ndim)).astype(x.dtype)


class GroupNorm(eqx.Module):
    """GroupNorm over (H, W, channels of a group) with an affine transform, computed in float32."""

    weight: Float[Array, " c"]
    bias: Float[Array, " c"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True, default=GROUP_NORM_EPS)

    def __call__(self, x: Float[Array, "H W c"]) -> Float[Array, "H W c"]:
        height, width, channels = x.shape
        # PyTorch groups consecutive channels: group g holds channels [g·c/G, (g+1)·c/G).
        grouped = x.astype(jnp.float32).reshape(height * width, self.groups, channels // self.groups)
        mean = jnp.mean(grouped, axis=(0, 2), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(0, 2), keepdims=True)  # biased, as torch
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(height, width, channels)
        return (y * _per_channel(self.weight, 3) + _per_channel(self.bias, 3)).astype(x.dtype)


def _group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(jnp.ones((channels,)), jnp.zeros((channels,)), groups)


class ResnetBlock2D(eqx.Module):
    """norm → SiLU → conv, twice, plus a (1x1-projected when the width changes) skip connection."""

    norm1: GroupNorm
    conv1: Conv2d
    norm2: GroupNorm
    conv2: Conv2d
    conv_shortcut: Conv2d | None

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, dtype: str, key: PRNGKeyArray):
        conv1_key, conv2_key, shortcut_key = jr.split(key, 3)
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, dtype=dtype, key=conv1_key)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, dtype=dtype, key=conv2_key)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, key=shortcut_key) if in_channels != out_channels else None
        )

    def __call__(self, x: Float[Array, "H W cin"]) -> Float[Array, "H W cout"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # the VAEs' dropout is 0, and a no-op at inference anyway
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(eqx.Module):
    """Single-head self-attention over all H·W positions, with a pre-GroupNorm and a residual connection.

    diffusers' `Attention` as the VAE's mid-block builds it (`_from_deprecated_attn_block`): one head as wide as
    the channels, scale 1/sqrt(channels).
    """

    group_norm: GroupNorm
    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: tuple[Linear]  # diffusers' `to_out` is [Linear, Dropout]: the key is `to_out.0.weight`
    dtype: str = eqx.field(static=True)

    def __init__(self, channels: int, groups: int, *, dtype: str, key: PRNGKeyArray):
        q_key, k_key, v_key, out_key = jr.split(key, 4)
        self.group_norm = _group_norm(channels, groups)
        self.to_q = _linear(q_key, channels, channels)
        self.to_k = _linear(k_key, channels, channels)
        self.to_v = _linear(v_key, channels, channels)
        self.to_out = (_linear(out_key, channels, channels),)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "H W c"]) -> Float[Array, "H W c"]:
        height, width, channels = x.shape
        h = self.group_norm(x).reshape(height * width, channels)  # (n, c)
        dtype, policy = jnp.dtype(self.dtype), ExecutionPolicy(compute_dtype=self.dtype)
        # (n, heads=1, c): jax.nn.dot_product_attention takes (T, N, H) and uses the fused kernel where it can
        q, k, v = (proj(h, policy)[:, None, :].astype(dtype) for proj in (self.to_q, self.to_k, self.to_v))
        # jax's XLA attention promotes bf16 logits with float32 internally, which strict promotion rejects
        with jax.numpy_dtype_promotion("standard"):
            attended = jax.nn.dot_product_attention(q, k, v)[:, 0, :].astype(x.dtype)  # (n, c)
        return x + self.to_out[0](attended, policy).reshape(height, width, channels)


class Downsample2D(eqx.Module):
    """A stride-2 3x3 conv after zero padding of one row at the bottom and one column at the right."""

    conv: Conv2d

    def __init__(self, channels: int, *, dtype: str, key: PRNGKeyArray):
        # diffusers pads (0, 1, 0, 1) by hand and convolves unpadded: an asymmetric pad, unlike "SAME"
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, key=key)

    def __call__(self, x: Float[Array, "H W c"]) -> Float[Array, "h w c"]:
        return self.conv(x)


class Upsample2D(eqx.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3x3 conv."""

    conv: Conv2d

    def __init__(self, channels: int, *, dtype: str, key: PRNGKeyArray):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, key=key)

    def __call__(self, x: Float[Array, "H W c"]) -> Float[Array, "h w c"]:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1))


class DownEncoderBlock2D(eqx.Module):
    resnets: tuple[ResnetBlock2D, ...]
    downsamplers: tuple[Downsample2D, ...]  # empty in the last (lowest-resolution) block

    def __init__(
        self, in_channels: int, out_channels: int, cfg: VAEConfig, *, downsample: bool, dtype: str, key: PRNGKeyArray
    ):
        keys = jr.split(key, cfg.layers_per_block + 1)
        widths = [in_channels] + [out_channels] * cfg.layers_per_block
        self.resnets = tuple(
            ResnetBlock2D(widths[i], widths[i + 1], cfg.norm_num_groups, dtype=dtype, key=keys[i])
            for i in range(cfg.layers_per_block)
        )
        self.downsamplers = (Downsample2D(out_channels, dtype=dtype, key=keys[-1]),) if downsample else ()

    def __call__(self, x: Float[Array, "H W cin"]) -> Float[Array, "h w cout"]:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class UpDecoderBlock2D(eqx.Module):
    resnets: tuple[ResnetBlock2D, ...]
    upsamplers: tuple[Upsample2D, ...]  # empty in the last (full-resolution) block

    def __init__(
        self, in_channels: int, out_channels: int, cfg: VAEConfig, *, upsample: bool, dtype: str, key: PRNGKeyArray
    ):
        num_layers = cfg.layers_per_block + 1  # the decoder has one resnet more per block than the encoder
        keys = jr.split(key, num_layers + 1)
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = tuple(
            ResnetBlock2D(widths[i], widths[i + 1], cfg.norm_num_groups, dtype=dtype, key=keys[i])
            for i in range(num_layers)
        )
        self.upsamplers = (Upsample2D(out_channels, dtype=dtype, key=keys[-1]),) if upsample else ()

    def __call__(self, x: Float[Array, "H W cin"]) -> Float[Array, "h w cout"]:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
        return x


class UNetMidBlock2D(eqx.Module):
    """resnet → attention → resnet at the lowest resolution (no attention with `mid_block_add_attention=False`)."""

    resnets: tuple[ResnetBlock2D, ResnetBlock2D]
    attentions: tuple[Attention, ...]

    def __init__(self, channels: int, cfg: VAEConfig, *, dtype: str, key: PRNGKeyArray):
        first_key, attention_key, second_key = jr.split(key, 3)
        groups = cfg.norm_num_groups
        self.resnets = (
            ResnetBlock2D(channels, channels, groups, dtype=dtype, key=first_key),
            ResnetBlock2D(channels, channels, groups, dtype=dtype, key=second_key),
        )
        self.attentions = (
            (Attention(channels, groups, dtype=dtype, key=attention_key),) if cfg.mid_block_add_attention else ()
        )

    def __call__(self, x: Float[Array, "H W c"]) -> Float[Array, "H W c"]:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(eqx.Module):
    conv_in: Conv2d
    down_blocks: tuple[DownEncoderBlock2D, ...]
    mid_block: UNetMidBlock2D
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, cfg: VAEConfig, *, dtype: str, key: PRNGKeyArray):
        in_key, blocks_key, mid_key, out_key = jr.split(key, 4)
        widths = cfg.block_out_channels
        block_keys = jr.split(blocks_key, len(widths))
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, dtype=dtype, key=in_key)
        self.down_blocks = tuple(
            DownEncoderBlock2D(
                widths[max(i - 1, 0)], widths[i], cfg, downsample=i < len(widths) - 1, dtype=dtype, key=block_keys[i]
            )
            for i in range(len(widths))
        )
        self.mid_block = UNetMidBlock2D(widths[-1], cfg, dtype=dtype, key=mid_key)
        self.conv_norm_out = _group_norm(widths[-1], cfg.norm_num_groups)
        # mean and log-variance, stacked along channels
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, dtype=dtype, key=out_key)

    def __call__(self, x: Float[Array, "H W C"]) -> Float[Array, "h w L2"]:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(eqx.Module):
    conv_in: Conv2d
    mid_block: UNetMidBlock2D
    up_blocks: tuple[UpDecoderBlock2D, ...]
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, cfg: VAEConfig, *, dtype: str, key: PRNGKeyArray):
        in_key, mid_key, blocks_key, out_key = jr.split(key, 4)
        widths = cfg.block_out_channels[::-1]  # from the lowest resolution up
        block_keys = jr.split(blocks_key, len(widths))
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, dtype=dtype, key=in_key)
        self.mid_block = UNetMidBlock2D(widths[0], cfg, dtype=dtype, key=mid_key)
        self.up_blocks = tuple(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)], widths[i], cfg, upsample=i < len(widths) - 1, dtype=dtype, key=block_keys[i]
            )
            for i in range(len(widths))
        )
        self.conv_norm_out = _group_norm(widths[-1], cfg.norm_num_groups)
        self.conv_out = Conv2d(widths[-1], cfg.out_channels, 3, dtype=dtype, key=out_key)

    def __call__(self, z: Float[Array, "h w L"]) -> Float[Array, "H W C"]:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(eqx.Module):
    """diffusers' `AutoencoderKL`, one channels-last example per call.

    `dtype` is the conv/matmul compute dtype ("float32" or "bfloat16"); parameters are always float32, and
    GroupNorm and the residual stream stay in the input's dtype or float32.
    """

    encoder: Encoder
    decoder: Decoder
    quant_conv: Conv2d | None
    post_quant_conv: Conv2d | None
    config: VAEConfig = eqx.field(static=True)

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray, dtype: str = "float32"):
        _check_dtype(dtype)
        encoder_key, decoder_key, quant_key, post_quant_key = jr.split(key, 4)
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, key=encoder_key)
        self.decoder = Decoder(config, dtype=dtype, key=decoder_key)
        self.quant_conv = (
            Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, key=quant_key) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            Conv2d(latent, latent, 1, dtype=dtype, key=post_quant_key) if config.use_post_quant_conv else None
        )
        self.config = config

    def encode_moments(
        self, x: Float[Array, "H W C"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "h w L"], Float[Array, "h w L"]]:
        """The latent distribution of image `x`: its mean and (clamped, as diffusers) log-variance, both unscaled."""
        if x.ndim != 3 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode_moments expects one image (H, W, {self.config.in_channels}); got shape "
                f"{x.shape}. Batch with jax.vmap, or use StableVAE.encode on (B, H, W, C)."
            )
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Float[Array, "h w L"], *, key: PRNGKeyArray | None = None) -> Float[Array, "H W C"]:
        """The image (roughly in [-1, 1], not clipped) of an unscaled latent `z`."""
        if z.ndim != 3 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode expects one latent (h, w, {self.config.latent_channels}); got shape "
                f"{z.shape}. Batch with jax.vmap, or use StableVAE.decode on (B, h, w, C)."
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def _rename_legacy_attention(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename pre-0.14 diffusers attention keys (`query`, `key`, `value`, `proj_attn`) to the current ones.

    The published sd-vae-ft-* safetensors still use the old names.
    """
    pattern = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
    renamed = {}
    for name, value in state.items():
        match = pattern.fullmatch(name)
        if match:
            prefix, old, kind = match.groups()
            name = f"{prefix}.{_LEGACY_ATTENTION[old]}.{kind}"
        renamed[name] = value
    return renamed


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def load_diffusers_weights(
    config: VAEConfig, state: Mapping[str, Any], *, dtype: str = "float32", source: str = "the state dict"
) -> AutoencoderKL:
    """An `AutoencoderKL` holding a diffusers state dict (name → array in PyTorch layout, any float dtype).

    Accepts the old attention key names and attention weights stored as 1x1 convs. Raises a ValueError listing
    missing, unexpected or wrongly shaped tensors; `source` names where they came from in that message.
    """
    _check_dtype(dtype)
    skeleton = eqx.filter_eval_shape(AutoencoderKL, config, key=jr.key(0), dtype=dtype)
    # a parameter's pytree path is its diffusers key, so the skeleton's leaf names are the expected keys
    shapes = {name: leaf.shape for name, leaf in named_leaves(skeleton).items()}
    torch_state = {}
    for name, value in _rename_legacy_attention(state).items():
        value = np.asarray(value)
        if value.ndim == 4 and len(shapes.get(name, ())) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # attention projections saved as 1x1 convs
        torch_state[name] = value
    if any(name.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for name in torch_state):
        advice = (
            "These look like an original (CompVis/LDM) checkpoint, not diffusers format: convert it once with "
            "diffusers' AutoencoderKL.from_single_file(path).save_pretrained(folder)."
        )
    else:
        advice = "Check that config.json is the one saved with these weights."
    expected = {name: _torch_shape(shape) for name, shape in shapes.items()}
    check_tensors(expected, torch_state, source=source, target=str(config), advice=advice)
    ours = {  # (O, I, kh, kw) -> (kh, kw, I, O)
        name: (value.transpose(2, 3, 1, 0) if value.ndim == 4 else value).astype(np.float32)
        for name, value in torch_state.items()
    }
    return fill(skeleton, ours, source=source, target=str(config), advice=advice)


def _read_state_dict(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], pathlib.Path]:
    for path in (folder / WEIGHTS_NAME, folder / PICKLE_WEIGHTS_NAME):
        if path.is_file():
            advice = (f"Install torch, or put {WEIGHTS_NAME} (the same weights; the sd-vae-ft-* repos have both) "
                      f"next to {CONFIG_NAME}.")
            return read_tensors(path, torch_advice=advice), path
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}); it holds {_few(present) or 'nothing'}. "
        f"A VAE folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, as diffusers' save_pretrained writes them."
    )


def _download_instructions(repo_id: str) -> str:
    return (
        "Pass a local folder instead, laid out as diffusers saves a VAE:\n"
        f"    <folder>/{CONFIG_NAME}\n"
        f"    <folder>/{WEIGHTS_NAME}\n"
        "Get it on a machine with network access, e.g.\n"
        f"    hf download {repo_id} {CONFIG_NAME} {WEIGHTS_NAME} --local-dir weights/{repo_id.split('/')[-1]}\n"
        "(`huggingface-cli download` with the same arguments on huggingface_hub < 1.0), copy the folder over, "
        f"and call StableVAE.from_pretrained('weights/{repo_id.split('/')[-1]}')."
    )


def _snapshot(repo_id: str, subfolder: str | None, revision: str | None) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError(
            f"Downloading {repo_id!r} needs huggingface_hub (pip install huggingface_hub). "
            + _download_instructions(repo_id)
        ) from err
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(
            repo_id, revision=revision, allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME]
        )
    except Exception as err:  # offline, no network, unknown or gated repo: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and the files are not in the local cache" if offline else str(err)
        raise FileNotFoundError(
            f"Could not get the VAE {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{reason.splitlines()[0] if reason else ''}).\n" + _download_instructions(repo_id)
        ) from err
    return pathlib.Path(root) / subfolder if subfolder else pathlib.Path(root)


def _resolve_folder(path_or_hub_id: str | os.PathLike, subfolder: str | None, revision: str | None) -> pathlib.Path:
    path = pathlib.Path(path_or_hub_id).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}.")
        return folder
    text = os.fspath(path_or_hub_id)
    if path.exists():
        raise FileNotFoundError(
            f"{path} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if _HUB_ID.fullmatch(text):
        return _snapshot(text, subfolder, revision)
    raise FileNotFoundError(
        f"No folder at {path.resolve()}. Pass a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a Hub id "
        f"such as {HUB_IDS[0]!r}."
    )


class StableVAE(eqx.Module):
    """A Stable Diffusion VAE for batches of channels-last images, with latents in the flow model's scale.

    `encode` maps images (B, H, W, C) in [-1, 1] to latents (B, H/f, W/f, latent_channels) multiplied by the
    scaling factor (f = `downsample_factor`, 8 for the SD VAE); `decode` inverts that. Both are jitted
    (`eqx.filter_jit`, one trace per shape) and run in the compute dtype chosen at load time. On GPUs JAX's default
    precision gives float32 convs tensor-core inputs (~1e-3 relative error on an H200); for exact float32, call
    them under `jax.default_matmul_precision("highest")` (about 8x slower there).

        vae = StableVAE.from_pretrained("weights/sd-vae-ft-ema")          # or "stabilityai/sd-vae-ft-ema"
        latents = vae.encode(images, key=key)                             # (B, 32, 32, 4) for 256x256 images
        images = vae.decode(latents)
    """

    model: AutoencoderKL

    @property
    def config(self) -> VAEConfig:
        return self.model.config

    @property
    def downsample_factor(self) -> int:
        return self.model.config.downsample_factor

    @property
    def num_params(self) -> int:
        return count_params(self.model)

    @classmethod
    def random(cls, config: VAEConfig, *, key: PRNGKeyArray, dtype: str = "float32") -> StableVAE:
        """A randomly initialised VAE (PyTorch's default init), for tests and smoke runs."""
        return cls(AutoencoderKL(config, key=key, dtype=dtype))

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype: str = "float32",
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> StableVAE:
        """Load a diffusers-format VAE: a local folder, or a Hub id such as "stabilityai/sd-vae-ft-ema".

        The folder holds `config.json` and `diffusion_pytorch_model.safetensors` (read without torch); a folder
        with only `diffusion_pytorch_model.bin` is read when torch is installed. Hub ids are fetched with
        `huggingface_hub.snapshot_download` (config and safetensors only); offline, that fails at once with a
        FileNotFoundError saying how to get the folder instead. `subfolder="vae"` reads the VAE of a full
        pipeline repo. `dtype` is the compute dtype ("float32" or "bfloat16").
        """
        _check_dtype(dtype)
        folder = _resolve_folder(path_or_hub_id, subfolder, revision)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {CONFIG_NAME}. A VAE folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, as diffusers' "
                "save_pretrained writes them."
            )
        try:
            raw_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); download it again.") from err
        config = VAEConfig.from_diffusers_config(raw_config)
        state, weights_path = _read_state_dict(folder)
        return cls(load_diffusers_weights(config, state, dtype=dtype, source=str(weights_path)))

    def save_pretrained(self, folder: str | os.PathLike) -> pathlib.Path:
        """Write `config.json` and `diffusion_pytorch_model.safetensors` as diffusers would; returns the folder."""
        folder = pathlib.Path(folder)
        tensors = {}
        for name, leaf in named_leaves(self.model).items():
            value = np.asarray(leaf, dtype=np.float32)
            # (kh, kw, I, O) -> (O, I, kh, kw)
            tensors[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        write_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        # config last: a folder with a config.json is a complete one
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_diffusers_config(), indent=2) + "\n")
        return folder

    def with_compute_dtype(self, dtype: str) -> StableVAE:
        """The same weights, with convs and matmuls computed in `dtype` ("float32" or "bfloat16")."""
        _check_dtype(dtype)
        skeleton = eqx.filter_eval_shape(AutoencoderKL, self.config, key=jr.key(0), dtype=dtype)
        leaves = jax.tree_util.tree_leaves(self.model)
        return StableVAE(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(skeleton), leaves))

    def _check_images(self, images: Float[Array, "b H W C"]) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"StableVAE expects images (B, H, W, {cfg.in_channels}) in [-1, 1]; got shape {images.shape}."
            )
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"image height and width (={images.shape[1]}, {images.shape[2]}) must be divisible by the VAE's "
                f"downsampling factor {f}; crop or resize the images."
            )

    @eqx.filter_jit
    def encode_distribution(
        self, images: Float[Array, "b H W C"]
    ) -> tuple[Float[Array, "b h w L"], Float[Array, "b h w L"]]:
        """Mean and standard deviation of the latent distribution, in the flow model's scale.

        That is `(mean - shift_factor) * scaling_factor` and `std * scaling_factor`, so `mean + std * eps` with
        `eps ~ N(0, I)` is a latent as `encode(images, key=...)` draws it; pre-extracted data sets store these two.
        """
        self._check_images(images)
        mean, logvar = jax.vmap(self.model.encode_moments)(images)
        std = jnp.exp(0.5 * logvar)
        if self.config.shift_factor is not None:
            mean = mean - self.config.shift_factor
        return mean * self.config.scaling_factor, std * self.config.scaling_factor

    @eqx.filter_jit
    def encode(self, images: Float[Array, "b H W C"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b h w L"]:
        """Latents of `images` (B, H, W, C) in [-1, 1], scaled: a sample when `key` is given, the mean otherwise."""
        mean, std = self.encode_distribution(images)
        if key is None:
            return mean
        return mean + std * jr.normal(key, mean.shape, mean.dtype)

    @eqx.filter_jit
    def decode(self, latents: Float[Array, "b h w L"]) -> Float[Array, "b H W C"]:
        """Images (B, H, W, C), roughly in [-1, 1] and not clipped, of scaled latents (B, h, w, latent_channels)."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"StableVAE.decode expects latents (B, h, w, {cfg.latent_channels}); got shape {latents.shape}."
            )
        z = latents / cfg.scaling_factor
        if cfg.shift_factor is not None:
            z = z + cfg.shift_factor
        return jax.vmap(self.model.decode)(z)
