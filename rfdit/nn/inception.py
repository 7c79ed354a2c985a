"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) as Equinox modules, channels-last.

Published FIDs (ADM, DiT, SiT, torch-fidelity, pytorch-fid, TTUR) all use this graph, which
differs from torchvision's ImageNet Inception-v3: its average pools skip the zero padding
(TF's SAME pooling), the last block max-pools where the paper average-pools, and its weights
are TF's. Numbers are comparable only with this graph *and* its input pipeline:

    images in [-1, 1] -> uint8 pixels -> TF1 bilinear resize to 299x299 -> (x - 128) / 128

One example per call: `InceptionV3(...)(image)` maps an image (H, W, 3) in [-1, 1] of any
size to its 2048-d pool3 features. Batches go through `jax.vmap` (`rfdit.metrics.fid`'s
`fid_inception` does that under `jax.jit`).

Weights are the published PyTorch ports (torch-fidelity's and pytorch-fid's, one state-dict
naming); `convert_inception_weights` turns one into safetensors once, so later runs need
neither torch nor a network. `load_inception` finds them in `default_weights_dir()`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.error
import urllib.request
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..weights import check_tensors, fill, named_leaves, read_tensors, write_tensors

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3  # the TF graph's (and both PyTorch ports') BatchNorm epsilon
NUM_LOGITS = 1008  # the graph's classifier (1000 ImageNet classes + 8 unused); only checked, not loaded

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_FILE}"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILE}"
# torch.hub names files `<name>-<first 8 hex digits of their sha256>.pth`; both ports carry the same hash.
WEIGHTS_SHA256_PREFIX = "6726825d"
_PTH_FILES = (TORCH_FIDELITY_FILE, PYTORCH_FID_FILE)
_SAFETENSORS_FILES = tuple(name.removesuffix(".pth") + ".safetensors" for name in _PTH_FILES)
_OFFLINE_VARS = ("RFDIT_OFFLINE", "HF_HUB_OFFLINE")


def quantize_pixels(images: Float[Array, "*batch h w c"]) -> Float[Array, "*batch h w c"]:
    """Images in [-1, 1] -> integer pixel values 0..255 (as float32), as samples are saved to uint8.

    `floor(clip(127.5·x + 128, 0, 255))`, i.e. (x+1)·127.5 rounded half up: DiT's and SiT's
    `sample_ddp.py` write their FID samples this way. torch-fidelity itself accepts only uint8,
    so the quantisation is the sampler's; this is the one behind the numbers we compare with.
    Computed in float32 even for bfloat16 inputs, whose 8-bit mantissa would merge levels.
    """
    x = images.astype(jnp.float32)
    return jnp.floor(jnp.clip(127.5 * x + 128.0, 0.0, 255.0))


def _tf1_sample_positions(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # TF1's resize_bilinear with align_corners=False and no half-pixel centres: output pixel i
    # reads input position i·(in/out), computed in float32 like the TF kernel (and torch-fidelity).
    scale = np.float32(in_size / out_size)
    position = np.arange(out_size, dtype=np.float32) * scale
    low = np.floor(position).astype(np.int32)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, position - low.astype(np.float32)


def resize_bilinear_tf1(image: Float[Array, "h w c"], height: int, width: int) -> Float[Array, "h2 w2 c"]:
    """Bilinear resize exactly as TensorFlow 1.x's `tf.image.resize_bilinear` (align_corners=False).

    Not `jax.image.resize`: TF1 samples at `i·in/out` (no half-pixel offset), which shifts the
    image by up to half a pixel and is part of what the published statistics measured.
    Interpolates along the width first, then the height, in float32 (torch-fidelity's order).
    """
    in_h, in_w, _ = image.shape
    y_low, y_high, dy = _tf1_sample_positions(in_h, height)
    x_low, x_high, dx = _tf1_sample_positions(in_w, width)
    image = image.astype(jnp.float32)

    def along_width(rows: Float[Array, "h2 w c"]) -> Float[Array, "h2 w2 c"]:
        left, right = rows[:, x_low], rows[:, x_high]
        return left + (right - left) * dx[None, :, None]

    top, bottom = along_width(image[y_low]), along_width(image[y_high])  # (height, width, c) each
    return top + (bottom - top) * dy[:, None, None]


class ConvBN(eqx.Module):
    """Bias-free convolution, inference BatchNorm (folded into a per-channel affine), ReLU."""

    weight: Float[Array, "kh kw cin cout"]  # HWIO
    scale: Float[Array, " cout"]  # gamma / sqrt(running_var + eps)
    shift: Float[Array, " cout"]  # beta - running_mean * scale
    stride: int = eqx.field(static=True)
    padding: tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        key: PRNGKeyArray,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        fan_in = kh * kw * in_channels
        # He-normal keeps random-weight activations O(1) through the 17 conv layers (smoke runs, tests).
        self.weight = jr.normal(key, (kh, kw, in_channels, out_channels)) * np.float32(np.sqrt(2.0 / fan_in))
        self.scale = jnp.ones((out_channels,))
        self.shift = jnp.zeros((out_channels,))
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            # Full float32: TF32/bf16 passes on GPUs would move features by ~1e-3 relative.
            precision=jax.lax.Precision.HIGHEST,
        )[0]
        return jax.nn.relu(y * self.scale[None, None] + self.shift[None, None])


def _max_pool(x: Float[Array, "h w c"], stride: int, padding: int = 0) -> Float[Array, "h2 w2 c"]:
    """3x3 max pool; padding counts as -inf (PyTorch's and TF's SAME max pool)."""
    pad = ((padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (3, 3, 1), (stride, stride, 1), pad)


def _avg_pool_valid_only(x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    """3x3 stride-1 average pool that averages over in-image pixels only (TF's SAME average pool).

    torchvision's blocks divide by 9 at the border too (count_include_pad=True); the FID graph does not.
    """
    height, width, _ = x.shape
    pad = ((1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (3, 3, 1), (1, 1, 1), pad)

    def in_image(size: int) -> np.ndarray:  # how many of the 3 taps land inside the image
        taps = np.full(size, 3.0, np.float32)
        taps[0] -= 1
        taps[-1] -= 1
        return np.maximum(taps, 1.0)  # a size-1 axis sees only its own pixel

    count = np.outer(in_image(height), in_image(width))[:, :, None].astype(x.dtype)
    return total / count


class InceptionA(eqx.Module):
    """Mixed_5b/5c/5d (35x35): 1x1, 5x5, double 3x3 and pooled branches."""

    branch1x1: ConvBN
    branch5x5_1: ConvBN
    branch5x5_2: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3: ConvBN
    branch_pool: ConvBN

    def __init__(self, in_channels: int, pool_features: int, *, key: PRNGKeyArray):
        keys = jr.split(key, 7)
        self.branch1x1 = ConvBN(in_channels, 64, 1, key=keys[0])
        self.branch5x5_1 = ConvBN(in_channels, 48, 1, key=keys[1])
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, key=keys[2])
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, key=keys[3])
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, key=keys[4])
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, key=keys[5])
        self.branch_pool = ConvBN(in_channels, pool_features, 1, key=keys[6])

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w d"]:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(eqx.Module):
    """Mixed_6a: 35x35 -> 17x17 reduction."""

    branch3x3: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3: ConvBN

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        keys = jr.split(key, 4)
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2, key=keys[0])
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, key=keys[1])
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, key=keys[2])
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, key=keys[3])

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 d"]:
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, b3dbl, _max_pool(x, stride=2)], axis=-1)


class InceptionC(eqx.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 branches."""

    branch1x1: ConvBN
    branch7x7_1: ConvBN
    branch7x7_2: ConvBN
    branch7x7_3: ConvBN
    branch7x7dbl_1: ConvBN
    branch7x7dbl_2: ConvBN
    branch7x7dbl_3: ConvBN
    branch7x7dbl_4: ConvBN
    branch7x7dbl_5: ConvBN
    branch_pool: ConvBN

    def __init__(self, in_channels: int, channels_7x7: int, *, key: PRNGKeyArray):
        c7 = channels_7x7
        keys = jr.split(key, 10)
        self.branch1x1 = ConvBN(in_channels, 192, 1, key=keys[0])
        self.branch7x7_1 = ConvBN(in_channels, c7, 1, key=keys[1])
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), key=keys[2])
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), key=keys[3])
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1, key=keys[4])
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), key=keys[5])
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), key=keys[6])
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), key=keys[7])
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), key=keys[8])
        self.branch_pool = ConvBN(in_channels, 192, 1, key=keys[9])

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w d"]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b7, b7dbl, bp], axis=-1)


class InceptionD(eqx.Module):
    """Mixed_7a: 17x17 -> 8x8 reduction."""

    branch3x3_1: ConvBN
    branch3x3_2: ConvBN
    branch7x7x3_1: ConvBN
    branch7x7x3_2: ConvBN
    branch7x7x3_3: ConvBN
    branch7x7x3_4: ConvBN

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        keys = jr.split(key, 6)
        self.branch3x3_1 = ConvBN(in_channels, 192, 1, key=keys[0])
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, key=keys[1])
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1, key=keys[2])
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), key=keys[3])
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), key=keys[4])
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, key=keys[5])

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 d"]:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, stride=2)], axis=-1)


class InceptionE(eqx.Module):
    """Mixed_7b/7c (8x8): expanded 3x3 branches; Mixed_7c's pooled branch max-pools (the graph's quirk)."""

    branch1x1: ConvBN
    branch3x3_1: ConvBN
    branch3x3_2a: ConvBN
    branch3x3_2b: ConvBN
    branch3x3dbl_1: ConvBN
    branch3x3dbl_2: ConvBN
    branch3x3dbl_3a: ConvBN
    branch3x3dbl_3b: ConvBN
    branch_pool: ConvBN
    pool: str = eqx.field(static=True)

    def __init__(self, in_channels: int, pool: str, *, key: PRNGKeyArray):
        keys = jr.split(key, 9)
        self.branch1x1 = ConvBN(in_channels, 320, 1, key=keys[0])
        self.branch3x3_1 = ConvBN(in_channels, 384, 1, key=keys[1])
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), key=keys[2])
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), key=keys[3])
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1, key=keys[4])
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, key=keys[5])
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), key=keys[6])
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), key=keys[7])
        self.branch_pool = ConvBN(in_channels, 192, 1, key=keys[8])
        self.pool = pool

    def __check_init__(self):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool (={self.pool!r}) must be 'avg' or 'max'.")

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w d"]:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = jnp.concatenate([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], axis=-1)
        pooled = _max_pool(x, stride=1, padding=1) if self.pool == "max" else _avg_pool_valid_only(x)
        return jnp.concatenate([b1, b3, b3dbl, self.branch_pool(pooled)], axis=-1)


class InceptionV3(eqx.Module):
    """The FID Inception-v3 up to pool3. Field names follow the PyTorch ports' state-dict keys.

    `InceptionV3(key=...)` has random (He-normal) weights, for smoke runs and tests only; FIDs
    need the published weights: `load_inception()`.
    """

    Conv2d_1a_3x3: ConvBN
    Conv2d_2a_3x3: ConvBN
    Conv2d_2b_3x3: ConvBN
    Conv2d_3b_1x1: ConvBN
    Conv2d_4a_3x3: ConvBN
    Mixed_5b: InceptionA
    Mixed_5c: InceptionA
    Mixed_5d: InceptionA
    Mixed_6a: InceptionB
    Mixed_6b: InceptionC
    Mixed_6c: InceptionC
    Mixed_6d: InceptionC
    Mixed_6e: InceptionC
    Mixed_7a: InceptionD
    Mixed_7b: InceptionE
    Mixed_7c: InceptionE

    def __init__(self, *, key: PRNGKeyArray):
        keys = jr.split(key, 16)
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, key=keys[0])
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, key=keys[1])
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, key=keys[2])
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, key=keys[3])
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, key=keys[4])
        self.Mixed_5b = InceptionA(192, pool_features=32, key=keys[5])
        self.Mixed_5c = InceptionA(256, pool_features=64, key=keys[6])
        self.Mixed_5d = InceptionA(288, pool_features=64, key=keys[7])
        self.Mixed_6a = InceptionB(288, key=keys[8])
        self.Mixed_6b = InceptionC(768, channels_7x7=128, key=keys[9])
        self.Mixed_6c = InceptionC(768, channels_7x7=160, key=keys[10])
        self.Mixed_6d = InceptionC(768, channels_7x7=160, key=keys[11])
        self.Mixed_6e = InceptionC(768, channels_7x7=192, key=keys[12])
        self.Mixed_7a = InceptionD(768, key=keys[13])
        self.Mixed_7b = InceptionE(1280, pool="avg", key=keys[14])
        self.Mixed_7c = InceptionE(2048, pool="max", key=keys[15])

    def __call__(self, image: Float[Array, "h w 3"], *, key: PRNGKeyArray | None = None) -> Float[Array, "2048"]:
        """pool3 features of one image (H, W, 3) in [-1, 1], any size.

        Takes [-1, 1] as produced by samplers and VAE decodes: do not map `2x - 1` first.
        """
        return self.pool3(quantize_pixels(image))

    def pool3(self, pixels: Float[Array, "h w 3"]) -> Float[Array, "2048"]:
        """pool3 features from pixel values in [0, 255] (uint8 data cast to float)."""
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(
                f"InceptionV3 expects one RGB image (H, W, 3), channels-last; got shape {pixels.shape}. "
                "Batch with jax.vmap; repeat grayscale to 3 channels."
            )
        x = resize_bilinear_tf1(pixels, INPUT_SIZE, INPUT_SIZE)  # (299, 299, 3)
        x = (x - 128.0) / 128.0  # the graph's Sub/Mul; exact in float32
        x = self.Conv2d_1a_3x3(x)  # (149, 149, 32)
        x = self.Conv2d_2a_3x3(x)  # (147, 147, 32)
        x = self.Conv2d_2b_3x3(x)  # (147, 147, 64)
        x = _max_pool(x, stride=2)  # (73, 73, 64)
        x = self.Conv2d_3b_1x1(x)  # (73, 73, 80)
        x = self.Conv2d_4a_3x3(x)  # (71, 71, 192)
        x = _max_pool(x, stride=2)  # (35, 35, 192)
        x = self.Mixed_5b(x)  # (35, 35, 256)
        x = self.Mixed_5c(x)  # (35, 35, 288)
        x = self.Mixed_5d(x)  # (35, 35, 288)
        x = self.Mixed_6a(x)  # (17, 17, 768)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # (17, 17, 768)
        x = self.Mixed_7a(x)  # (8, 8, 1280)
        x = self.Mixed_7b(x)  # (8, 8, 2048)
        x = self.Mixed_7c(x)  # (8, 8, 2048)
        return jnp.mean(x, axis=(0, 1))  # (2048,)


def _conv_paths(model: InceptionV3) -> list[tuple[str, ConvBN]]:
    """(state-dict prefix, layer) for every ConvBN, e.g. ("Mixed_5b.branch1x1", ...)."""
    return list(named_leaves(model, is_leaf=lambda node: isinstance(node, ConvBN)).items())


def _state_dict_names(prefix: str) -> tuple[str, ...]:
    names = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    return tuple(f"{prefix}.{name}" for name in names)


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str = "the state dict") -> InceptionV3:
    """An `InceptionV3` from a PyTorch-port state dict (torch-fidelity's / pytorch-fid's names) as numpy.

    Conv weights are (O, I, kh, kw) and become HWIO; BatchNorm (eps 1e-3) is folded into a
    per-channel scale and shift. `num_batches_tracked` and the classifier `fc.*` are not used.
    `source` names where the state dict came from in error messages.
    """
    skeleton = eqx.filter_eval_shape(InceptionV3, key=jr.key(0))
    layers = _conv_paths(skeleton)
    if any(name.startswith("AuxLogits.") for name in state_dict) or (
        "fc.weight" in state_dict and tuple(state_dict["fc.weight"].shape) != (NUM_LOGITS, FEATURE_DIM)
    ):
        raise ValueError(
            "These weights look like torchvision's ImageNet Inception-v3 (AuxLogits, or a classifier "
            f"that is not {NUM_LOGITS}x{FEATURE_DIM}), not the FID graph of 2015-12-05; FIDs computed with "
            f"them are not comparable. Use {TORCH_FIDELITY_FILE} or {PYTORCH_FID_FILE}."
        )
    expected = {}
    for prefix, layer in layers:
        kh, kw, cin, cout = layer.weight.shape
        weight_name, *bn_names = _state_dict_names(prefix)
        expected |= {weight_name: (cout, cin, kh, kw), **{name: (cout,) for name in bn_names}}
    used = {name: value for name, value in state_dict.items()
            if not (name.endswith(".num_batches_tracked") or name.startswith("fc."))}
    target = "the FID Inception-v3 (TF's 2015-12-05 graph)"
    advice = f"Expected the key names of torch-fidelity's {TORCH_FIDELITY_FILE} or pytorch-fid's {PYTORCH_FID_FILE}."
    check_tensors(expected, used, source=source, target=target, advice=advice)

    arrays = {}
    for prefix, _ in layers:
        weight_name, *bn_names = _state_dict_names(prefix)
        gamma, beta, mean, var = (np.asarray(used[name], np.float64) for name in bn_names)
        scale = gamma / np.sqrt(var + BATCH_NORM_EPS)
        arrays[f"{prefix}.weight"] = np.asarray(used[weight_name], np.float32).transpose(2, 3, 1, 0)  # HWIO
        arrays[f"{prefix}.scale"] = scale.astype(np.float32)
        arrays[f"{prefix}.shift"] = (beta - mean * scale).astype(np.float32)
    return fill(skeleton, arrays, source=source, target=target, advice=advice)


def _torch_advice() -> str:
    return (
        "Install torch once and convert the file with rfdit.nn.inception.convert_inception_weights, or convert it "
        f"on another machine and copy the .safetensors into {default_weights_dir()}; later runs need no torch."
    )


def convert_inception_weights(pth: str | os.PathLike, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Convert torch-fidelity's or pytorch-fid's `.pth` to safetensors (needs torch, once).

    The tensors keep their state-dict names and layouts (checked to be the FID graph), so the
    file is the same weights in a format that numpy reads. `out` defaults to the `.pth`'s name
    with `.safetensors` in `default_weights_dir()`. Returns the written path.
    """
    state = read_tensors(pth, torch_advice=_torch_advice())
    inception_from_state_dict(state, source=str(pth))  # refuse to write anything that would not load
    out = pathlib.Path(out) if out is not None else default_weights_dir() / (pathlib.Path(pth).stem + ".safetensors")
    _save_safetensors(state, out, source=pathlib.Path(pth).name)
    return out


def _save_safetensors(state: Mapping[str, np.ndarray], out: pathlib.Path, source: str) -> None:
    # written atomically: a half-written file must never be found by the search
    tensors = {name: value for name, value in state.items() if not name.endswith("num_batches_tracked")}
    write_tensors(out, tensors, metadata={"format": "fid-inception-v3-2015-12-05", "source": source})


def default_weights_dir() -> pathlib.Path:
    """Where `load_inception()` looks: `$RFDIT_CACHE/inception`, else `$XDG_CACHE_HOME/rfdit/inception`
    (by default `~/.cache/rfdit/inception`)."""
    if os.environ.get("RFDIT_CACHE"):
        return pathlib.Path(os.environ["RFDIT_CACHE"]).expanduser() / "inception"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "rfdit" / "inception"


def _torch_hub_dir() -> pathlib.Path:
    # torch-fidelity and pytorch-fid download through torch.hub, so earlier runs of either left the .pth here.
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return pathlib.Path(torch_home).expanduser() / "hub" / "checkpoints"


def _find_weights(folders: list[pathlib.Path]) -> pathlib.Path | None:
    for names in (_SAFETENSORS_FILES, _PTH_FILES):  # safetensors first: no torch needed
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
    return None


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_VARS)


def _download(url: str, dest: pathlib.Path, timeout: float = 60.0) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
    if not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        partial.unlink()
        raise ValueError(f"Downloaded {url}, but its sha256 does not start with {WEIGHTS_SHA256_PREFIX}; not using it.")
    os.replace(partial, dest)  # atomic: an interrupted download never looks complete


def _missing_weights_message(searched: list[pathlib.Path], why: str) -> str:
    folder = default_weights_dir()
    stem = TORCH_FIDELITY_FILE.removesuffix(".pth")
    return (
        f"FID Inception weights not found ({why}). Looked for {', '.join(_SAFETENSORS_FILES + _PTH_FILES)} "
        f"in {', '.join(map(str, searched))}.\n"
        f"Download {TORCH_FIDELITY_FILE} (~95 MB) from\n  {WEIGHTS_URL}\n"
        f"(or pytorch-fid's {PYTORCH_FID_FILE}, a port of the same TF weights: {PYTORCH_FID_URL})\n"
        f"and put it in {folder}/ (set $RFDIT_CACHE to move it), e.g.\n"
        f"  mkdir -p {folder} && curl -L -o {folder}/{TORCH_FIDELITY_FILE} {WEIGHTS_URL}\n"
        f"Reading a .pth needs torch once; load_inception() then writes {folder}/{stem}.safetensors, "
        "or convert by hand with\n"
        "  python -c \"from rfdit.nn.inception import convert_inception_weights as c; "
        f"c('{folder}/{TORCH_FIDELITY_FILE}')\"\n"
        "and later runs need neither torch nor a network. Or pass weights_path=... explicitly."
    )


def load_inception(weights_path: str | os.PathLike | None = None, *, download: bool = True) -> InceptionV3:
    """The FID Inception with the published weights.

    Args:
        weights_path: a `.safetensors` written by `convert_inception_weights`, torch-fidelity's
            `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
            (a `.pth` needs torch), or a folder holding one. None searches `default_weights_dir()`,
            then torch.hub's checkpoint folder (where torch-fidelity and pytorch-fid cache them).
        download: with no weights found, fetch torch-fidelity's file into `default_weights_dir()`
            unless $RFDIT_OFFLINE or $HF_HUB_OFFLINE is set.

    A `.pth` found by the search (not one passed explicitly) is also written as safetensors into
    `default_weights_dir()`, which the next search finds first, so later runs need no torch.
    Without weights a `FileNotFoundError` says what to download and where to put it.
    """
    if weights_path is not None:
        path = pathlib.Path(weights_path).expanduser()
        if path.is_dir():
            found = _find_weights([path])
            if found is None:
                raise FileNotFoundError(_missing_weights_message([path], f"no weights file in the folder {path}"))
            path = found
        elif not path.is_file():
            raise FileNotFoundError(_missing_weights_message([path.parent], f"{path} does not exist"))
        return _load_file(path)

    searched = [default_weights_dir(), _torch_hub_dir()]
    path = _find_weights(searched)
    if path is None:
        if not download:
            raise FileNotFoundError(_missing_weights_message(searched, "download=False"))
        if _offline():
            offline = [var for var in _OFFLINE_VARS if os.environ.get(var)]
            raise FileNotFoundError(_missing_weights_message(searched, f"offline: {', '.join(offline)} set"))
        path = default_weights_dir() / TORCH_FIDELITY_FILE
        try:
            _download(WEIGHTS_URL, path)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(_missing_weights_message(searched, f"download failed: {error}")) from error
    if path.suffix == ".pth":
        state = read_tensors(path, torch_advice=_torch_advice())
        model = inception_from_state_dict(state, source=str(path))
        try:  # the one-time conversion: found first next time, so later runs need no torch
            _save_safetensors(state, default_weights_dir() / (path.stem + ".safetensors"), source=path.name)
        except OSError:
            pass  # a read-only cache only costs torch again next time
        return model
    return _load_file(path)


def _load_file(path: pathlib.Path) -> InceptionV3:
    return inception_from_state_dict(read_tensors(path, torch_advice=_torch_advice()), source=str(path))
