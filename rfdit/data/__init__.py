"""Data sets behind one deterministic, resumable batch iterator.

`load_dataset(name, ...)` returns a `Dataset`: its shape facts and a training batch
source whose batch at global step s is fixed by (seed, s), so resuming at step s sees
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from .digits import load_digits_split
from .pipeline import ArrayBatches, Prefetcher


@dataclasses.dataclass
class Dataset:
    name: str
    image_size: int
    channels: int
    num_classes: int
    train: ArrayBatches
    eval_images: np.ndarray  # a held-out (or training) sample for reconstructions and losses
    eval_labels: np.ndarray

    def batches(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.train.iterate(start_step)


DATASET_NAMES = ("digits",)


def load_dataset(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    debug_overfit: bool = False,
    **_: object,
) -> Dataset:
    """Load a data set by name; images come as float32 in [-1, 1], channels-last."""
    if name == "digits":
        split = load_digits_split()
        images, labels = split["train_images"], split["train_labels"]
        if debug_overfit:  # the original's debug mode: a handful of examples, repeated
            images, labels = np.repeat(images[:8], max(1, batch_size // 8 + 1), 0), np.repeat(labels[:8], 
                                                                                             max(1, batch_size // 8 + 1), 0)
        train = ArrayBatches(images, labels, batch_size, seed=seed, process_index=process_index,
                             process_count=process_count)
        return Dataset("digits", 8, 1, 10, train, split["test_images"], split["test_labels"])
    raise ValueError(f"Unknown data set {name!r}; valid names: {list(DATASET_NAMES)}.")


__all__ = ["ArrayBatches", "Dataset", "DATASET_NAMES", "Prefetcher", "load_dataset", "load_digits_split"]
