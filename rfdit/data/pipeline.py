"""Deterministic, resumable, per-process batches over a random-access source.

The order is a function of (seed, epoch) alone: every epoch is a fresh permutation,
and the batch at global step s is fixed, so a run resumed at step s sees exactly the
batches the uninterrupted run would have. Each process takes its contiguous share of
every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ArrayBatches:
    """Global batches of (images, labels) from in-memory arrays, by step number."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        flip: bool = False,
    ):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length.")
        if batch_size % process_count:
            raise ValueError(f"batch_size (={batch_size}) must be divisible by the process count (={process_count}).")
        if batch_size > len(images):
            raise ValueError(
                f"batch_size (={batch_size}) exceeds the data set's size (={len(images)}); use a smaller batch."
            )
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.flip = batch_size, seed, flip
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = len(images) // batch_size  # the remainder is dropped each epoch

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices for global step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        batch = order[position * self.batch_size : (position + 1) * self.batch_size]
        share = self.batch_size // self.process_count
        return batch[self.process_index * share : (self.process_index + 1) * share]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(step)
        images = self.images[idx]
        if self.flip:  # random horizontal flip, a function of (seed, step) too
            flips = np.random.default_rng([self.seed, step, 1]).random(len(idx)) < 0.5
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        return images, self.labels[idx]

    def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class Prefetcher:
    """Run an iterator in a background thread, `depth` items ahead of the consumer."""

    def __init__(self, iterator: Iterator, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._done = object()
        self._stop = threading.Event()

        def work():
            try:
                for item in iterator:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as error:  # re-raised in the consumer's thread
                self._queue.put(error)
            self._queue.put(self._done)

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._done:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
