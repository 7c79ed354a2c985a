"""Fréchet Inception Distance, comparable with published numbers (ADM, DiT, SiT, torch-fidelity).

    feature_fn = fid_inception()                        # images (B, H, W, 3) in [-1, 1] -> (B, 2048)
    mu, sigma = compute_statistics(feature_fn, batches) # streams over an iterable of image batches
    ref_mu, ref_sigma = load_statistics("VIRTUAL_imagenet256_labeled.npz")   # ADM-style npz
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)

Images are in [-1, 1], as samplers and VAE decodes produce them: never map `2x - 1` first
(the Flax original did, which squeezed every sample into [-3, 1] before quantisation).
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Callable, Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Float
from tqdm import tqdm

from ..nn.inception import InceptionV3, load_inception

FeatureFn = Callable[[Float[Array, "b h w 3"]], Float[Array, "b d"]]


def fid_inception(
    weights_path: str | os.PathLike | None = None, *, model: InceptionV3 | None = None
) -> Callable[[Float[Array | np.ndarray, "b h w 3"]], Float[Array, "b 2048"]]:
    """A jitted function from images (B, H, W, 3) in [-1, 1] to pool3 features (B, 2048).

    Args:
        weights_path: see `rfdit.nn.inception.load_inception` (None: the default location).
        model: use this Inception instead of loading one, e.g. `InceptionV3(key=...)` with
            random weights for smoke runs (their FIDs mean nothing; label them so).

    Each new (B, H, W) compiles once: keep the batch size fixed (`compute_statistics` pads
    the last batch for this).
    """
    if model is None:
        model = load_inception(weights_path)
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def pool3(params, images):  # params as an argument, not a closure: no 90 MB of HLO constants
        return jax.vmap(eqx.combine(params, static))(images)

    def features(images: Float[Array | np.ndarray, "b h w 3"]) -> Float[Array, "b 2048"]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"fid_inception expects images (B, H, W, 3) in [-1, 1], channels-last; got shape {images.shape}. "
                "Transpose NCHW to NHWC; repeat grayscale to 3 channels."
            )
        return pool3(params, jnp.asarray(images))

    return features


def feature_statistics(features: Float[Array | np.ndarray, "n d"]) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): the features' mean and covariance (`np.cov`, rowvar=False, n-1), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features (N, D) with N >= 2; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def compute_statistics(
    feature_fn: FeatureFn,
    batches: Iterable[Float[Array | np.ndarray, "_b h w 3"]],  # _b: batch sizes may differ
    *,
    num_images: int | None = None,
    progress: bool = True,
    desc: str = "FID features",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of `feature_fn`'s features over a stream of image batches, without keeping them.

    Args:
        feature_fn: e.g. `fid_inception()`; images (B, H, W, 3) in [-1, 1] -> features (B, D).
        batches: an iterable of image batches (numpy or jax), any batch sizes.
        num_images: stop after this many images (the last batch is cut); None: use them all.
        progress: show a tqdm bar of images seen.

    Equals `feature_statistics` on the concatenated features (float64 mean, `np.cov` with
    N-1) up to float64 rounding: batches are merged with Chan et al.'s pairwise update, which
    avoids the cancellation of the sum-of-squares formula. A batch smaller than the first is
    padded to its size before `feature_fn`, so a jitted `feature_fn` compiles once.
    """
    if num_images is not None and num_images < 2:
        raise ValueError(f"num_images (={num_images}) must be >= 2 to estimate a covariance.")
    count, mean, scatter = 0, None, None  # scatter: sum of outer products of deviations from the mean
    batch_size = None
    with tqdm(total=num_images, desc=desc, unit="img", disable=not progress) as bar:
        for index, images in enumerate(batches):
            if num_images is not None and count >= num_images:
                break
            if num_images is not None:
                images = images[: num_images - count]
            size = images.shape[0]
            if size == 0:
                continue
            batch_size = batch_size or size
            if size < batch_size:
                pad = [(0, batch_size - size)] + [(0, 0)] * (images.ndim - 1)
                images = np.pad(np.asarray(images), pad, mode="edge")
            features = np.asarray(feature_fn(images), dtype=np.float64)[:size]
            if features.ndim != 2 or features.shape[0] != size:
                raise ValueError(f"feature_fn must return features (B, D) = ({size}, D); got shape {features.shape}.")
            if not np.isfinite(features).all():
                raise ValueError(
                    f"feature_fn returned non-finite features for batch {index}: check the images for NaN/inf "
                    "(a diverged sampler?) before computing FID."
                )
            batch_mean = features.mean(axis=0)
            centred = features - batch_mean
            batch_scatter = centred.T @ centred
            if mean is None:
                count, mean, scatter = size, batch_mean, batch_scatter
            else:
                total = count + size
                delta = batch_mean - mean
                mean = mean + delta * (size / total)
                scatter = scatter + batch_scatter + np.outer(delta, delta) * (count * size / total)
                count = total
            bar.update(size)
    if count < 2:
        raise ValueError(f"compute_statistics saw {count} images; it needs at least 2 to estimate a covariance.")
    if num_images is not None and count < num_images:
        raise ValueError(f"batches ran out after {count} images; num_images asked for {num_images}.")
    return mean, scatter / (count - 1)


def frechet_distance(
    mu1: Float[Array | np.ndarray, " d"],
    sigma1: Float[Array | np.ndarray, "d d"],
    mu2: Float[Array | np.ndarray, " d"],
    sigma2: Float[Array | np.ndarray, "d d"],
    eps: float = 1e-6,
) -> float:
    """‖mu1 - mu2‖² + tr(sigma1 + sigma2 - 2·sqrt(sigma1·sigma2)), with pytorch-fid's numerics.

    In float64 with `scipy.linalg.sqrtm`. If the square root is not finite (a singular
    product), it is retaken with `eps` added to both diagonals, with a warning. A complex
    square root (round-off around zero eigenvalues) keeps its real part, unless an imaginary
    part on its diagonal exceeds 1e-3, which raises: the inputs are not covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length; got shapes {mu1.shape} and {mu2.shape}.")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"sigma1 and sigma2 must be ({d}, {d}) to match mu; got {sigma1.shape} and {sigma2.shape}. "
            "Were the statistics computed with the same feature extractor?"
        )

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"The product of the covariances is singular; adding {eps} to their diagonals (as pytorch-fid does). "
            "More samples than feature dimensions avoid this.",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"sqrt(sigma1·sigma2) has an imaginary component of {largest:.3g}: the sigmas are not "
                "positive semi-definite covariances (corrupt statistics, or different feature extractors?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from an npz with keys `mu` (D,) and `sigma` (D, D).

    Reads ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`, whose other keys
    `arr_0`, `mu_s`, `sigma_s` are ignored) and files written by `save_statistics`.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics file {path} not found. Expected an npz with keys 'mu' and 'sigma' "
            "(ADM's reference batches, or one written by rfdit.metrics.save_statistics)."
        )
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path} is not a numpy file: {error}") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array of shape {data.shape}; expected an npz with keys 'mu' and 'sigma'.")
    with data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(
                f"{path} has keys {data.files}; FID statistics need 'mu' and 'sigma' (missing {missing}). "
                "An npz of images only (arr_0) must go through compute_statistics first."
            )
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: expected mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path} holds non-finite statistics.")
    return mu, sigma


def save_statistics(
    path: str | os.PathLike, mu: Float[np.ndarray, " d"], sigma: Float[np.ndarray, "d d"], **extra: object
) -> None:
    """Write (mu, sigma) as an ADM-style npz (keys `mu`, `sigma`, float64) that `load_statistics` reads;
    `extra` entries (not None) are stored beside them."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.")
    path = pathlib.Path(path).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"statistics path {path} must end in .npz (numpy would append it silently).")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items() if v is not None})
