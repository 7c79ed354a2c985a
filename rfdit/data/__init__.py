"""Data sets behind one deterministic, resumable batch iterator.

`load_dataset(name, ...)` returns a `Dataset`: its shape facts and a training batch
source whose batch at global step s is fixed by (seed, s), so resuming at step s sees
exactly what the uninterrupted run would have.

| name | source |
| --- | --- |
| `digits` | scikit-learn's bundled 8×8 digits (embedded) |
| `cifar10`, `cifar100`, `tiny-imagenet` | the Hub, streamed; or a local copy in the Hub's layout (`path`) |
| `imagefolder`, `imagenet256`, `imagenet128`, `celebahq256` | an image folder (`path`): class subfolders or flat |
| `imagenet256`, `imagenet128`, `celebahq256` | or a prepared TFDS build (`tfds_data_dir`) |
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .digits import load_digits_split
from .hub import HUB_DATASETS, open_local, open_stream
from .images import list_image_folder, load_image, to_float
from .pipeline import (
    ArrayBatches,
    BatchSource,
    DecodedBatches,
    FileSource,
    MemorySource,
    Prefetcher,
    RandomAccessSource,
    StreamBatches,
    Subset,
)
from .tfds import TFDS_NAMES, open_tfds

logger = logging.getLogger("rfdit.data")

DATASET_NAMES = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "imagenet256", "imagenet128",
                 "celebahq256")
FOLDER_DATASETS = ("imagefolder", "imagenet256", "imagenet128", "celebahq256")
IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagefolder": 64, "imagenet256": 256,
               "imagenet128": 128, "celebahq256": 256}
EVAL_SIZE = 256  # held-out images decoded up front, for reconstructions and loss-by-t
EVAL_SEED = 0  # the same eval sample for every run, whatever its seed
OVERFIT_SIZE = 8  # --debug_overfit: the original's handful of examples, repeated


@dataclasses.dataclass
class Dataset:
    name: str
    image_size: int
    channels: int
    num_classes: int
    train: BatchSource
    eval_images: np.ndarray  # a held-out (or training) sample for reconstructions and losses
    eval_labels: np.ndarray

    def batches(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.train.iterate(start_step)

    def stats(self) -> dict[str, int]:
        """Counters worth logging: `corrupt_images` (records that failed to decode, each counted once
        where it can be identified) and `substituted_examples` (batch slots that got a replacement).
        Counted by this process, since it started, including batches decoded ahead of the loop."""
        return self.train.stats()


def _eval_sample(source: RandomAccessSource, image_size: int, num_workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Up to EVAL_SIZE records (a fixed random sample, unflipped); unreadable ones are left out."""
    indices = np.random.default_rng(EVAL_SEED).permutation(len(source))[:EVAL_SIZE]
    raws, labels = source.fetch(indices)

    def one(raw):
        try:
            return load_image(raw, image_size)
        except Exception as error:
            return error

    with ThreadPoolExecutor(num_workers or 4) as pool:
        decoded = list(pool.map(one, raws))
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, Exception)]
    if not keep:
        first = decoded[0]
        raise ValueError(f"none of {len(raws)} sampled images decodes (e.g. {source.describe(int(indices[0]))}: "
                         f"{type(first).__name__}: {first}); check the data.")
    if len(keep) < len(raws):
        logger.warning("%d of %d evaluation images failed to decode and were left out", len(raws) - len(keep),
                       len(raws))
    images = to_float(np.stack([decoded[i] for i in keep]))
    return images, np.asarray(labels, np.int32)[keep]


def _require_train_decodes(source: RandomAccessSource, image_size: int) -> None:
    """Fail before training when the training records hold no image at all (e.g. a wrong column)."""
    indices = np.arange(min(len(source), OVERFIT_SIZE))
    raws, _ = source.fetch(indices)
    errors = []
    for raw in raws:
        try:
            load_image(raw, image_size)
            return
        except Exception as error:
            errors.append(error)
    raise ValueError(f"none of the first {len(raws)} training images decodes ({source.describe(0)}: "
                     f"{type(errors[0]).__name__}: {errors[0]}); check the data.")


def _eval_split(splits: dict, preferred: str) -> str:
    for name in (preferred, "validation", "valid", "test"):
        if name in splits:
            return name
    return "train"


def load_dataset(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    debug_overfit: bool = False,
    path: str | None = None,
    image_size: int | None = None,
    tfds_data_dir: str | None = None,
    num_classes: int | None = None,
    streaming: bool | None = None,
    shuffle_buffer: int = 10_000,
    num_workers: int | None = None,
    prefetch: int = 2,
    flip: bool = True,
) -> Dataset:
    """Load a data set by name; images come as float32 in [-1, 1], channels-last.

    Args:
        name: one of `DATASET_NAMES`.
        batch_size: the global batch; each process gets `batch_size // process_count` of it.
        seed: fixes the order of every epoch and the flips.
        process_index, process_count: this process's share (`jax.process_index()`/`count()`).
        debug_overfit: train on a handful of examples, repeated.
        path: a local copy (Hub layout for cifar10/cifar100/tiny-imagenet; an image folder for the rest).
        image_size: resolution after centre crop and resize; defaults to the data set's own.
        tfds_data_dir: a TFDS data dir with a prepared build (imagenet256/imagenet128/celebahq256).
        num_classes: the model's number of classes, if known; a data set with more is an error.
        streaming: stream the Hub data sets (default: when no `path` is given). With a `path`,
            streams the local files through the same shuffle buffer as the Hub.
        shuffle_buffer: records in a stream's shuffle buffer.
        num_workers: decoding threads (default: the CPU count, at most 16).
        prefetch: global batches decoded ahead, besides the one being consumed.
        flip: random horizontal flips of training images (ADM/DiT); turn off for reference
            statistics or feature extraction that must see the images as they are.

    Every check of the data (columns, labels, decodability, the network) happens here, before
    training starts.
    """
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer (={shuffle_buffer}) must be at least 1 (1 keeps the stream's order).")
    options = dict(seed=seed, process_index=process_index, process_count=process_count, flip=flip,
                   num_workers=num_workers, prefetch=prefetch)
    if name == "digits":
        data = _digits(batch_size, seed, process_index, process_count, debug_overfit)
    elif name in HUB_DATASETS:
        if tfds_data_dir is not None:
            raise ValueError(f"--tfds_data_dir serves {', '.join(TFDS_NAMES)}; {name} comes from the Hub or "
                             "--dataset_path.")
        stream = (path is None) if streaming is None else streaming
        size = image_size or IMAGE_SIZES[name]
        if stream:
            train, eval_source = _hub_stream(name, batch_size, path, size, debug_overfit, shuffle_buffer, options)
        else:
            train, eval_source = _hub_local(name, batch_size, path, size, debug_overfit, options)
        data = _image_dataset(name, size, train, eval_source, num_workers)
    elif name in FOLDER_DATASETS:
        size = image_size or IMAGE_SIZES[name]
        source, eval_source = _local_images(name, path, tfds_data_dir)
        _require_train_decodes(source, size)
        train = DecodedBatches(_overfit(source, batch_size) if debug_overfit else source, batch_size, image_size=size,
                               **options)
        data = _image_dataset(name, size, train, eval_source, num_workers)
    else:
        raise ValueError(f"Unknown data set {name!r}; valid names: {list(DATASET_NAMES)}.")
    if num_classes is not None and data.num_classes > num_classes:
        raise ValueError(f"{name} has {data.num_classes} classes but the model has num_classes={num_classes}; pass "
                         f"--model.num_classes {data.num_classes}.")
    return data


def _digits(batch_size: int, seed: int, process_index: int, process_count: int, debug_overfit: bool) -> Dataset:
    split = load_digits_split()
    images, labels = split["train_images"], split["train_labels"]
    if debug_overfit:  # the original's debug mode: a handful of examples, repeated
        images, labels = np.repeat(images[:8], max(1, batch_size // 8 + 1), 0), np.repeat(labels[:8],
                                                                                         max(1, batch_size // 8 + 1), 0)
    train = ArrayBatches(images, labels, batch_size, seed=seed, process_index=process_index,
                         process_count=process_count)
    return Dataset("digits", 8, 1, 10, train, split["test_images"], split["test_labels"])


def _image_dataset(name: str, size: int, train: BatchSource, eval_source: RandomAccessSource,
                   num_workers: int | None) -> Dataset:
    eval_images, eval_labels = _eval_sample(eval_source, size, num_workers)
    return Dataset(name, size, 3, train.num_classes, train, eval_images, eval_labels)


def _hub_stream(name: str, batch_size: int, path: str | None, size: int, debug_overfit: bool, shuffle_buffer: int,
                options: dict) -> tuple[BatchSource, RandomAccessSource]:
    """Batches streamed from the Hub (or from local files, when `path` is given)."""
    spec = HUB_DATASETS[name]

    def held(records: list, where: str) -> MemorySource:
        labels = np.array([label for _, label in records], np.int32)
        return MemorySource([raw for raw, _ in records], labels, spec.num_classes, where)

    stream = open_stream(spec, "train", path=path, seed=options["seed"], buffer_size=shuffle_buffer)
    head = held(stream.first(OVERFIT_SIZE), stream.where)
    _require_train_decodes(head, size)
    try:
        held_out = open_stream(spec, spec.eval_split, path=path, seed=options["seed"], buffer_size=shuffle_buffer)
        eval_source = held(held_out.first(EVAL_SIZE), held_out.where)
    except ValueError:
        if path is None:
            raise
        eval_source = held(stream.first(EVAL_SIZE), stream.where)  # a local copy without that split
    if debug_overfit:
        return DecodedBatches(_overfit(head, batch_size), batch_size, image_size=size, **options), eval_source
    return StreamBatches(stream.open_epoch, stream.num_examples, batch_size, image_size=size,
                         num_classes=spec.num_classes, where=stream.where, **options), eval_source


def _hub_local(name: str, batch_size: int, path: str | None, size: int, debug_overfit: bool,
               options: dict) -> tuple[BatchSource, RandomAccessSource]:
    """Batches from a local copy in the Hub's layout, read at random."""
    spec = HUB_DATASETS[name]
    if path is None:
        raise ValueError(f"streaming=False needs a local copy of {spec.hub_id}: pass --dataset_path.")
    splits = open_local(path, spec)
    source = splits["train"]
    _require_train_decodes(source, size)
    train = DecodedBatches(_overfit(source, batch_size) if debug_overfit else source, batch_size, image_size=size,
                           **options)
    return train, splits[_eval_split(splits, spec.eval_split)]


def _local_images(name: str, path: str | None,
                  tfds_data_dir: str | None) -> tuple[RandomAccessSource, RandomAccessSource]:
    """The training and evaluation sources of an image folder or a TFDS build."""
    if tfds_data_dir is not None and path is not None:
        raise ValueError("give one of --dataset_path (an image folder) and --tfds_data_dir, not both.")
    if tfds_data_dir is not None:
        if name not in TFDS_NAMES:
            raise ValueError(f"--tfds_data_dir serves {', '.join(TFDS_NAMES)}, not {name}; pass --dataset_path "
                             "with an image folder.")
        splits = open_tfds(name, tfds_data_dir)
        return splits["train"], splits[_eval_split(splits, "validation")]
    if path is None:
        extra = " or --tfds_data_dir DIR (a prepared TFDS build)" if name in TFDS_NAMES else ""
        raise ValueError(f"{name} reads local images: pass --dataset_path DIR (a folder of class subfolders, or a "
                         f"flat folder of images){extra}.")
    paths, labels, class_names = list_image_folder(path)
    source = FileSource(paths, labels, max(1, len(class_names)))
    return source, source  # no held-out split in a folder: evaluation uses a fixed sample of it


def _overfit(source: RandomAccessSource, batch_size: int) -> Subset:
    """The first few records, repeated to fill at least one batch."""
    count = min(OVERFIT_SIZE, len(source))
    return Subset(source, np.resize(np.arange(count), max(batch_size, count)))


__all__ = [
    "ArrayBatches",
    "BatchSource",
    "Dataset",
    "DATASET_NAMES",
    "DecodedBatches",
    "Prefetcher",
    "StreamBatches",
    "load_dataset",
    "load_digits_split",
]
