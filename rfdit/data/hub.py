"""Hugging Face data sets: streamed from the Hub, or read from a local copy in the Hub's layout.

A local copy (`--dataset_path DIR`) is either the repository's parquet shards, as
`hf download <id> --repo-type dataset --local-dir DIR` leaves them
(`DIR/plain_text/train-00000-of-00001.parquet`, `DIR/data/valid-*.parquet`, ...), or a
folder written by `datasets`' `save_to_disk`. Both are random access (Arrow tables), so
every epoch is a full permutation and resume is exact and free. Streaming from the Hub
goes through a seeded shuffle buffer instead (see `StreamBatches`). Either way the image
column is read undecoded and decoded by the pipeline's threads, the same code for both.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator

import numpy as np

from .pipeline import RandomAccessSource, buffer_shuffle

SPLIT_NAMES = ("train", "test", "valid", "validation")


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """Where a data set lives on the Hub and what its columns are called."""

    hub_id: str
    image_column: str
    label_column: str
    num_classes: int
    image_size: int
    eval_split: str


HUB_DATASETS = {
    "cifar10": HubSpec("uoft-cs/cifar10", "img", "label", 10, 32, "test"),
    "cifar100": HubSpec("uoft-cs/cifar100", "img", "fine_label", 100, 32, "test"),
    "tiny-imagenet": HubSpec("Maysee/tiny-imagenet", "image", "label", 200, 64, "valid"),
}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download_hint(spec: HubSpec) -> str:
    return (f"Pass --dataset_path DIR with a local copy, made where there is network access with "
            f"`hf download {spec.hub_id} --repo-type dataset --local-dir DIR`.")


def _probe_address() -> tuple[str, int]:
    """The host and port a Hub request would first connect to (the proxy, if one is set)."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def require_hub(spec: HubSpec, *, timeout: float = 5.0) -> None:
    """Raise a clear `ValueError` within `timeout` seconds when the Hub can't be reached.

    Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) fails at once; otherwise one TCP
    connection to the endpoint (or proxy) is tried, in a thread so that a hanging DNS
    lookup can't stall it either, instead of letting `datasets` retry for minutes.
    """
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(os.environ.get(variable)):
            raise ValueError(
                f"{spec.hub_id} streams from the Hugging Face Hub, but {variable}={os.environ[variable]} (offline "
                f"mode). {_download_hint(spec)}"
            )
    host, port = _probe_address()
    outcome: list[BaseException | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=connect, daemon=True, name="rfdit-hub-probe")
    thread.start()
    thread.join(timeout)
    if not outcome or outcome[0] is not None:
        reason = f"{type(outcome[0]).__name__}: {outcome[0]}" if outcome else f"no answer within {timeout:g} s"
        raise ValueError(f"can't reach the Hugging Face Hub at {host}:{port} to stream {spec.hub_id} ({reason}). "
                         f"{_download_hint(spec)}")


def _split_of(path: pathlib.Path, root: pathlib.Path) -> str | None:
    """The split a parquet shard belongs to: its name's prefix (`train-0000...`) or a folder name."""
    prefix = path.stem.split("-")[0].split(".")[0].lower()
    if prefix in SPLIT_NAMES:
        return prefix
    for part in reversed(path.relative_to(root).parent.parts):
        if part.lower() in SPLIT_NAMES:
            return part.lower()
    return None


def parquet_splits(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """The parquet shards under `root`, grouped by split (unnamed shards count as train)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
    splits: dict[str, list[pathlib.Path]] = {}
    for f in files:
        splits.setdefault(_split_of(f, root if root.is_dir() else root.parent) or "train", []).append(f)
    return splits


def _is_saved_dataset(root: pathlib.Path) -> bool:
    return root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file())


def _check_columns(available: list[str], spec: HubSpec, where: str) -> None:
    missing = [c for c in (spec.image_column, spec.label_column) if c not in available]
    if missing:
        raise ValueError(
            f"{where} has no column {', '.join(repr(c) for c in missing)} (its columns: {', '.join(available)}); "
            f"{spec.hub_id} keeps images in {spec.image_column!r} and labels in {spec.label_column!r}. Check "
            "--dataset_name and --dataset_path."
        )


def _check_labels(labels: np.ndarray, spec: HubSpec, where: str) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise ValueError(f"the label column {spec.label_column!r} of {where} holds {labels.dtype}, not integers.")
    bad = np.flatnonzero((labels < 0) | (labels >= spec.num_classes))
    if len(bad):
        raise ValueError(
            f"label {int(labels[bad[0]])} (row {int(bad[0])}; {len(bad)} such rows) in column {spec.label_column!r} of "
            f"{where} lies outside [0, {spec.num_classes}) for {spec.hub_id}; check --dataset_name and the data."
        )
    return labels.astype(np.int32)


class ArrowSource(RandomAccessSource):
    """Rows of an Arrow table (image column undecoded), by index."""

    def __init__(self, take: Callable, labels: np.ndarray, spec: HubSpec, where: str):
        """`take(indices)` returns a `pyarrow.Table` of those rows holding at least the image column."""
        self._take, self.labels, self.spec, self.where = take, labels, spec, where
        self.num_classes = spec.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        table = self._take(np.asarray(indices, np.int64))
        return table.column(self.spec.image_column).to_pylist(), self.labels[indices]

    def describe(self, index: int) -> str:
        return f"row {index} of {self.where}"


def _parquet_source(files: list[pathlib.Path], spec: HubSpec, where: str) -> ArrowSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_columns(pq.read_schema(files[0]).names, spec, where)
    table = pa.concat_tables([pq.read_table(f, columns=[spec.image_column, spec.label_column]) for f in files])
    if table.num_rows == 0:
        raise ValueError(f"{where} holds no rows.")
    labels = _check_labels(table.column(spec.label_column).to_numpy(), spec, where)
    table = table.select([spec.image_column])
    return ArrowSource(table.take, labels, spec, where)


def _saved_source(dataset, spec: HubSpec, where: str) -> ArrowSource:
    _check_columns(list(dataset.column_names), spec, where)
    if len(dataset) == 0:
        raise ValueError(f"{where} holds no rows.")
    rows = dataset.select_columns([spec.image_column, spec.label_column]).with_format("arrow")
    labels = _check_labels(np.asarray(rows[spec.label_column]), spec, where)
    return ArrowSource(lambda indices: rows[indices.tolist()], labels, spec, where)


def open_local(path: str | os.PathLike, spec: HubSpec) -> dict[str, ArrowSource]:
    """The splits of a local copy (parquet shards or a `save_to_disk` folder), as random-access sources."""
    root = pathlib.Path(path)
    if not root.exists():
        raise ValueError(f"--dataset_path {str(path)!r} does not exist.")
    if _is_saved_dataset(root):
        import datasets

        loaded = datasets.load_from_disk(str(root))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if "train" not in parts:
            raise ValueError(f"the saved data set in {str(root)!r} has splits {list(parts)} but no 'train'.")
        return {split: _saved_source(ds, spec, f"split {split!r} of {str(root)!r}") for split, ds in parts.items()}
    splits = parquet_splits(root)
    if "train" not in splits:
        raise ValueError(
            f"found no parquet shards and no saved `datasets` folder in {str(root)!r}. Expected the Hub's layout "
            f"(e.g. {str(root / 'plain_text' / 'train-00000-of-00001.parquet')!r}) or a folder written by "
            f"`save_to_disk`. {_download_hint(spec)}"
        )
    return {split: _parquet_source(files, spec, f"split {split!r} ({len(files)} parquet file(s) in {str(root)!r})")
            for split, files in splits.items()}


@dataclasses.dataclass
class Stream:
    """A streamed split: records in a seeded order per epoch (shards permuted, then a shuffle
    buffer, both from `default_rng([seed, epoch])`), and its length."""

    open_epoch: Callable[[int], Iterator[tuple[object, int]]]
    num_examples: int
    where: str
    first: Callable[[int], list[tuple[object, int]]]  # the first n records, in the stream's own order


def open_stream(spec: HubSpec, split: str, *, path: str | os.PathLike | None, seed: int, buffer_size: int) -> Stream:
    """Stream `split` from the Hub (or from a local copy's files, when `path` is given)."""
    import datasets

    if path is None:
        require_hub(spec)
        where = f"{spec.hub_id} (split {split!r}, streamed)"
        try:
            ds = datasets.load_dataset(spec.hub_id, split=split, streaming=True)
        except Exception as error:  # network, auth and not-found errors come in many types
            raise ValueError(f"couldn't open {spec.hub_id} on the Hub ({type(error).__name__}: {error}). "
                             f"{_download_hint(spec)}") from error
        num_examples = _info_count(ds, split)
    else:
        root = pathlib.Path(path)
        where = f"split {split!r} of {str(root)!r} (streamed)"
        if _is_saved_dataset(root):
            loaded = datasets.load_from_disk(str(root))
            local = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            ds, num_examples = local.to_iterable_dataset(), len(local)
        else:
            files = parquet_splits(root).get(split)
            if not files:
                raise ValueError(f"found no parquet shards of split {split!r} in {str(root)!r}.")
            import pyarrow.parquet as pq

            num_examples = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            ds = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split,
                                       streaming=True)
    if ds.column_names is not None:
        _check_columns(list(ds.column_names), spec, where)
    label_feature = (ds.features or {}).get(spec.label_column)
    if isinstance(label_feature, datasets.ClassLabel) and label_feature.num_classes > spec.num_classes:
        raise ValueError(f"the label column {spec.label_column!r} of {where} has {label_feature.num_classes} classes; "
                         f"{spec.hub_id} should have {spec.num_classes}. Check --dataset_name.")
    ds = _undecoded(ds.select_columns([spec.image_column, spec.label_column]), spec)
    if num_examples is None:
        num_examples = sum(1 for _ in ds.select_columns([spec.label_column]))

    num_shards = int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1)

    def rows(iterable) -> Iterator[tuple[object, int]]:
        iterator = iter(iterable)
        try:
            for row in iterator:
                yield row[spec.image_column], row[spec.label_column]
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def in_order(shards: np.ndarray) -> Iterator[tuple[object, int]]:
        for index in shards:
            yield from rows(ds if num_shards == 1 else ds.shard(num_shards=num_shards, index=int(index)))

    def open_epoch(epoch: int) -> Iterator[tuple[object, int]]:
        # Our own shuffle over unshuffled shard streams: the order is ours, whatever the
        # `datasets` version (its buffer algorithm has changed between versions).
        rng = np.random.default_rng([seed, epoch])
        return buffer_shuffle(in_order(rng.permutation(num_shards)), buffer_size, rng)

    def first(n: int) -> list[tuple[object, int]]:
        return list(itertools.islice(in_order(np.arange(num_shards)), n))

    return Stream(open_epoch, num_examples, where, first)


def _undecoded(ds, spec: HubSpec):
    """The stream with its image column left encoded: the pipeline's threads decode it."""
    if hasattr(ds, "decode"):
        return ds.decode(False)
    import datasets

    if isinstance((ds.features or {}).get(spec.image_column), datasets.Image):
        return ds.cast_column(spec.image_column, datasets.Image(decode=False))
    return ds


def _info_count(ds, split: str) -> int | None:
    splits = getattr(ds.info, "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    count = getattr(info, "num_examples", None)
    return int(count) if count else None
