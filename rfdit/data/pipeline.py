"""Deterministic, resumable, per-process batches, with background decoding.

The order is a function of (seed, epoch) alone: every epoch is a fresh shuffle, and the
global batch at step s is fixed, so a run resumed at step s sees exactly the batches the
uninterrupted run would have. Each process takes its contiguous share of every global
batch, so the global batch does not depend on how many processes read it.

Sources:
- `ArrayBatches`: in-memory arrays (the embedded digits).
- `DecodedBatches`: a random-access source of encoded images (Arrow rows, files, TFDS
  records); every epoch is a permutation from `np.random.default_rng([seed, epoch])`.
- `StreamBatches`: a stream whose epoch order comes from a seeded shuffle buffer; resuming
  at step s replays the current epoch's stream up to s without decoding it.

A record that fails to decode is replaced by the next decodable record of the same global
batch (cyclically), so batches stay full and the replacement is itself a function of
(seed, step); each failure is logged once and counted in `stats()`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .images import load_image, to_float

logger = logging.getLogger("rfdit.data")
_LOGGED_FAILURES = 20


class BatchSource(abc.ABC):
    """Host batches (images float32 (B_local, H, W, C) in [-1, 1], labels int32 (B_local,)) by step."""

    batch_size: int
    steps_per_epoch: int

    @abc.abstractmethod
    def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches for steps start_step, start_step + 1, ... without end."""

    def stats(self) -> dict[str, int]:
        """Counters for the metrics (e.g. images that failed to decode)."""
        return {}


def _check_sizes(batch_size: int, process_count: int, process_index: int, num_examples: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index (={process_index}) must lie in [0, process_count={process_count}).")
    if batch_size % process_count:
        raise ValueError(f"batch_size (={batch_size}) must be divisible by the process count (={process_count}).")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size (={batch_size}) exceeds the data set's size (={num_examples}); use a smaller batch."
        )


class ArrayBatches(BatchSource):
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
        _check_sizes(batch_size, process_count, process_index, len(images))
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


class RandomAccessSource(abc.ABC):
    """Encoded records by index: what `DecodedBatches` reads. Fetching must be thread-safe."""

    num_classes: int

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        """The encoded records (anything `images.decode` takes) and int labels at `indices`."""

    def describe(self, index: int) -> str:
        """Where record `index` comes from, for messages."""
        return f"record {index}"


class MemorySource(RandomAccessSource):
    """Encoded records held in a list (a stream's first few records, for --debug_overfit)."""

    def __init__(self, records: list, labels: np.ndarray, num_classes: int, where: str = "memory"):
        self.records, self.labels, self.num_classes, self.where = records, np.asarray(labels), num_classes, where

    def __len__(self) -> int:
        return len(self.records)

    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        return [self.records[i] for i in indices], self.labels[indices]

    def describe(self, index: int) -> str:
        return f"record {index} of {self.where}"


class FileSource(RandomAccessSource):
    """Image files and their labels (an image folder)."""

    def __init__(self, paths: list[str], labels: np.ndarray, num_classes: int):
        self.paths, self.labels, self.num_classes = paths, labels, num_classes

    def __len__(self) -> int:
        return len(self.paths)

    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        return [self.paths[i] for i in indices], self.labels[indices]

    def describe(self, index: int) -> str:
        return self.paths[index]


class Subset(RandomAccessSource):
    """Records `indices` of `source`, in that order (repeats allowed)."""

    def __init__(self, source: RandomAccessSource, indices: np.ndarray):
        self.source, self.indices, self.num_classes = source, np.asarray(indices), source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        return self.source.fetch(self.indices[indices])

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))


class DecodeStats:
    """Thread-safe counts of failed decodes; each bad record is logged once (the first few)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.corrupt_images = 0
        self.substituted_examples = 0
        self.bad: dict[Hashable, str] = {}

    def failed(self, key: Hashable | None, where: str, error: BaseException) -> None:
        with self._lock:
            if key is not None:
                if key in self.bad:
                    return
                self.bad[key] = where
            self.corrupt_images += 1
            count = self.corrupt_images
        if count <= _LOGGED_FAILURES:
            logger.warning("skipping an unreadable image (%s): %s: %s", where, type(error).__name__, error)
            if count == _LOGGED_FAILURES:
                logger.warning("further unreadable images are counted in the data stats but not logged")

    def substituted(self) -> None:
        with self._lock:
            self.substituted_examples += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"corrupt_images": self.corrupt_images, "substituted_examples": self.substituted_examples}


@dataclasses.dataclass
class _GlobalBatch:
    """One global batch's records: this process's share up front, the rest on demand."""

    step: int
    record: Callable[[int], tuple[object, int]]  # slot -> (encoded record, label)
    describe: Callable[[int], str]
    key: Callable[[int], Hashable | None]  # slot -> identity for remembering bad records
    flips: np.ndarray  # bool (global batch,)


@dataclasses.dataclass
class _Pending:
    images: np.ndarray
    labels: np.ndarray
    futures: list[Future]


class _DecodingBatches(BatchSource):
    """Shared machinery: a thread pool decodes this process's share of upcoming batches."""

    def __init__(
        self,
        batch_size: int,
        *,
        image_size: int,
        num_classes: int,
        seed: int,
        process_index: int,
        process_count: int,
        flip: bool,
        num_workers: int | None,
        prefetch: int,
    ):
        self.batch_size, self.image_size, self.num_classes, self.seed = batch_size, image_size, num_classes, seed
        self.process_index, self.process_count, self.flip = process_index, process_count, flip
        self.num_workers = num_workers or max(1, min(16, os.cpu_count() or 1))
        self.prefetch = max(0, prefetch)
        self.share = batch_size // process_count
        self._stats = DecodeStats()

    @property
    def slots(self) -> range:
        """This process's slots in every global batch."""
        return range(self.process_index * self.share, (self.process_index + 1) * self.share)

    def _flips(self, step: int) -> np.ndarray:
        if not self.flip:
            return np.zeros(self.batch_size, bool)
        return np.random.default_rng([self.seed, step, 1]).random(self.batch_size) < 0.5

    @abc.abstractmethod
    def _global_batches(self, start_step: int) -> Iterator[_GlobalBatch]: ...

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def _decode_slot(self, batch: _GlobalBatch, slot: int, out: _Pending, row: int) -> None:
        for offset in range(self.batch_size):
            candidate = (slot + offset) % self.batch_size
            key = batch.key(candidate)
            if key is not None and key in self._stats.bad:
                continue
            raw, label = batch.record(candidate)
            try:
                pixels = load_image(raw, self.image_size)
            except Exception as error:  # any decoder failure: PIL raises OSError, ValueError, SyntaxError, ...
                self._stats.failed(key, batch.describe(candidate), error)
                continue
            if not 0 <= label < self.num_classes:
                raise ValueError(
                    f"label {label} of {batch.describe(candidate)} lies outside [0, {self.num_classes}); "
                    "check the label column and the data set's number of classes."
                )
            if offset:
                self._stats.substituted()
            out.images[row] = to_float(pixels[:, ::-1] if batch.flips[slot] else pixels)
            out.labels[row] = label
            return
        raise ValueError(
            f"no image of the global batch at step {batch.step} decodes (e.g. {batch.describe(slot)}); "
            "the data is unreadable: check the files or the image column."
        )

    def _submit(self, pool: ThreadPoolExecutor, batch: _GlobalBatch) -> _Pending:
        out = _Pending(np.empty((self.share, self.image_size, self.image_size, 3), np.float32),
                       np.empty((self.share,), np.int32), [])
        out.futures = [pool.submit(self._decode_slot, batch, slot, out, row) for row, slot in enumerate(self.slots)]
        return out

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch at `step`, decoded in the calling thread (for tests and inspection)."""
        batch = next(self._global_batches(step))
        out = _Pending(np.empty((self.share, self.image_size, self.image_size, 3), np.float32),
                       np.empty((self.share,), np.int32), [])
        for row, slot in enumerate(self.slots):
            self._decode_slot(batch, slot, out, row)
        return out.images, out.labels

    def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="rfdit-decode")
        batches = self._global_batches(start_step)
        pending: collections.deque[_Pending] = collections.deque()
        try:
            while True:
                while len(pending) <= self.prefetch:
                    pending.append(self._submit(pool, next(batches)))
                done = pending.popleft()
                for future in done.futures:
                    future.result()
                yield done.images, done.labels
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            batches.close()


class DecodedBatches(_DecodingBatches):
    """Batches decoded from a random-access source; a pure function of (seed, step).

    Every epoch is a permutation from `np.random.default_rng([seed, epoch])` (the remainder
    of each epoch is dropped); flips come from `default_rng([seed, step, 1])`, one per global
    slot, so neither depends on the process count.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        batch_size: int,
        *,
        image_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        flip: bool = True,
        num_workers: int | None = None,
        prefetch: int = 2,
    ):
        _check_sizes(batch_size, process_count, process_index, len(source))
        super().__init__(batch_size, image_size=image_size, num_classes=source.num_classes, seed=seed,
                         process_index=process_index, process_count=process_count, flip=flip,
                         num_workers=num_workers, prefetch=prefetch)
        self.source = source
        self.steps_per_epoch = len(source) // batch_size
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._order_lock = threading.Lock()

    def _order(self, epoch: int) -> np.ndarray:
        with self._order_lock:
            if self._order_cache is None or self._order_cache[0] != epoch:
                self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
            return self._order_cache[1]

    def global_indices(self, step: int) -> np.ndarray:
        """The source indices of the whole global batch at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This process's source indices at `step` (before any replacement of unreadable records)."""
        return self.global_indices(step)[self.slots.start : self.slots.stop]

    def _global_batches(self, start_step: int) -> Iterator[_GlobalBatch]:
        for step in itertools.count(start_step):
            indices = self.global_indices(step)
            own_raw, own_labels = self.source.fetch(indices[self.slots.start : self.slots.stop])
            own = {slot: (raw, int(label)) for slot, raw, label in zip(self.slots, own_raw, own_labels, strict=True)}

            def record(slot, indices=indices, own=own):
                if slot in own:
                    return own[slot]
                raws, labels = self.source.fetch(indices[slot : slot + 1])
                return raws[0], int(labels[0])

            yield _GlobalBatch(step, record, lambda slot, indices=indices: self.source.describe(int(indices[slot])),
                               lambda slot, indices=indices: int(indices[slot]), self._flips(step))


def buffer_shuffle(records: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of `buffer_size` records; deterministic given `rng`.

    Once the buffer is full, each incoming record swaps with a uniformly chosen buffered one,
    which is emitted; at the end the rest comes out in a random order.
    """
    buffer: list = []
    try:
        for record in records:
            if len(buffer) < buffer_size:
                buffer.append(record)
                continue
            slot = int(rng.integers(buffer_size))
            buffer[slot], record = record, buffer[slot]
            yield record
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()


def _close_in_background(iterator: object) -> None:
    """Close a half-read iterator without waiting (`datasets` sleeps seconds while closing a shuffled stream)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        threading.Thread(target=close, daemon=True, name="rfdit-close-stream").start()


class StreamBatches(_DecodingBatches):
    """Batches from a stream read in a seeded, per-epoch shuffled order.

    `open_epoch(epoch)` returns an iterator over (encoded record, label) in that epoch's
    order, the same on every process and every call (a shuffle buffer seeded by (seed,
    epoch)). Every process reads the whole stream and decodes only its share. Epochs hold
    `num_examples // batch_size` batches. Resuming at step s opens the epoch of s and skips
    the records before it without decoding them: exact, at the cost of re-reading up to
    one epoch of the stream.
    """

    def __init__(
        self,
        open_epoch: Callable[[int], Iterator[tuple[object, int]]],
        num_examples: int,
        batch_size: int,
        *,
        image_size: int,
        num_classes: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        flip: bool = True,
        num_workers: int | None = None,
        prefetch: int = 2,
        where: str = "the stream",
    ):
        _check_sizes(batch_size, process_count, process_index, num_examples)
        super().__init__(batch_size, image_size=image_size, num_classes=num_classes, seed=seed,
                         process_index=process_index, process_count=process_count, flip=flip,
                         num_workers=num_workers, prefetch=prefetch)
        self.open_epoch, self.num_examples, self.where = open_epoch, num_examples, where
        self.steps_per_epoch = num_examples // batch_size

    def _global_batches(self, start_step: int) -> Iterator[_GlobalBatch]:
        epoch, position = divmod(start_step, self.steps_per_epoch)
        while True:
            records = self.open_epoch(epoch)
            try:
                skipped = sum(1 for _ in itertools.islice(records, position * self.batch_size))
                if skipped < position * self.batch_size:
                    self._too_short(epoch, skipped)
                for p in range(position, self.steps_per_epoch):
                    chunk = list(itertools.islice(records, self.batch_size))
                    if len(chunk) < self.batch_size:
                        self._too_short(epoch, p * self.batch_size + len(chunk))
                    step = epoch * self.steps_per_epoch + p
                    first = p * self.batch_size

                    def describe(slot, first=first, epoch=epoch):
                        return f"example {first + slot} of epoch {epoch} of {self.where}"

                    yield _GlobalBatch(step, lambda slot, chunk=chunk: (chunk[slot][0], int(chunk[slot][1])), describe,
                                       lambda slot, step=step: (step, slot), self._flips(step))
            finally:
                _close_in_background(records)
            epoch, position = epoch + 1, 0

    def _too_short(self, epoch: int, seen: int) -> None:
        raise ValueError(
            f"{self.where} ended after {seen} examples in epoch {epoch}, but its metadata promised "
            f"{self.num_examples}; pass a local copy with --dataset_path instead."
        )


class Prefetcher:
    """Run an iterator in a background thread, `depth` items ahead of the consumer."""

    def __init__(self, iterator: Iterator, depth: int = 2):
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
