"""Pre-extracted VAE latents: encode a data set once, train on its latent distribution.

A latents folder holds the latent distribution of every image, not one sample of it,
so training draws a fresh latent each time an image comes round, as encoding on the
fly does:

    mean.npy, std.npy   (N, h, w, 4) float16, already × the VAE's scaling factor (memory-mapped)
    labels.npy          (N,) int32
    meta.json           image size, latent shape, number of classes, the VAE used

Batches come out as (B, h, w, 8): mean and std stacked on the channel axis; the training
loop draws `mean + std·ε` with a key derived from the step, so resume stays exact.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..nn.vae import StableVAE
from . import load_dataset
from .pipeline import ArrayBatches

META = "meta.json"


def read_latents_meta(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise ValueError(
            f"{path} is not a latents folder: expected {META}, mean.npy, std.npy and labels.npy in it, as "
            "experiments/extract_latents.py writes them."
        )
    return json.loads(meta_path.read_text())


class LatentBatches(ArrayBatches):
    """Batches of (mean ‖ std) latents with their labels, by step, from memory-mapped arrays."""

    def __init__(self, path: str | pathlib.Path, batch_size: int, **kwargs):
        path = pathlib.Path(path)
        self.meta = read_latents_meta(path)
        try:
            self.mean = np.load(path / "mean.npy", mmap_mode="r")
            self.std = np.load(path / "std.npy", mmap_mode="r")
            labels = np.load(path / "labels.npy")
        except (OSError, ValueError) as error:
            raise ValueError(f"the latents in {path} are unreadable ({error}); extract them again.") from error
        if not (self.mean.shape == self.std.shape and len(labels) == len(self.mean) == self.meta["count"]):
            raise ValueError(
                f"the latents in {path} are inconsistent: mean {self.mean.shape}, std {self.std.shape}, "
                f"{len(labels)} labels, meta count {self.meta['count']}; an extraction was cut short. Extract again."
            )
        super().__init__(np.empty((len(labels), 0)), labels, batch_size, **kwargs)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.sort(self.indices(step))  # sorted reads are kinder to a memory map; the order is irrelevant
        stacked = np.concatenate([self.mean[idx], self.std[idx]], axis=-1).astype(np.float32)
        return stacked, self.labels[idx]


def write_latents(
    out: str | pathlib.Path,
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    encode_distribution,
    *,
    count: int,
    meta: dict,
    progress: bool = True,
) -> pathlib.Path:
    """Encode `count` images from `batches` with `encode_distribution(images) -> (mean, std)` into `out`.

    `meta.json` is written last, so a folder with one is complete.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    mean_file = std_file = None
    labels = np.zeros((count,), np.int32)
    written = 0
    with tqdm(total=count, desc="encode", disable=not progress) as bar:
        for images, batch_labels in batches:
            mean, std = encode_distribution(images)
            mean, std = np.asarray(mean), np.asarray(std)
            if mean_file is None:
                shape = (count, *mean.shape[1:])
                mean_file = np.lib.format.open_memmap(out / "mean.npy", mode="w+", dtype=np.float16, shape=shape)
                std_file = np.lib.format.open_memmap(out / "std.npy", mode="w+", dtype=np.float16, shape=shape)
            take = min(len(mean), count - written)
            mean_file[written : written + take] = mean[:take]
            std_file[written : written + take] = std[:take]
            labels[written : written + take] = batch_labels[:take]
            written += take
            bar.update(take)
            if written >= count:
                break
    if written < count:
        raise ValueError(f"the data ran out after {written} of {count} images.")
    mean_file.flush()
    std_file.flush()
    np.save(out / "labels.npy", labels)
    (out / META).write_text(json.dumps({**meta, "count": count, "latent_shape": list(mean_file.shape[1:])}, indent=2))
    return out


def extract_latents(
    dataset_name: str,
    vae_path: str,
    out: str | pathlib.Path,
    *,
    dataset_path: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    num_images: int | None = None,
    vae_dtype: str = "float32",
    **dataset_options,
) -> pathlib.Path:
    """Encode one epoch of a data set (unflipped, the order of seed 0) with the VAE into `out`."""
    vae = StableVAE.from_pretrained(vae_path, dtype=vae_dtype)
    options = dict(path=dataset_path, flip=False, **dataset_options)
    if image_size is not None:
        options["image_size"] = image_size
    data = load_dataset(dataset_name, batch_size=batch_size, seed=0, **options)
    count = data.train.steps_per_epoch * batch_size
    count = count if num_images is None else min(count, num_images)
    meta = {"dataset_name": dataset_name, "image_size": data.image_size, "num_classes": data.num_classes,
            "vae_path": str(vae_path), "scaling_factor": vae.config.scaling_factor}
    return write_latents(out, data.batches(0), vae.encode_distribution, count=count, meta=meta)
