"""Prepared TFDS builds (`--tfds_data_dir`), read without TensorFlow.

`tfds.data_source` gives random access to builds stored as ArrayRecord files, with no
TensorFlow installed (`pip install 'rfdit[tfds]'`). Builds made in the older TFRecord format
need converting once: `tfds convert_format --root_data_dir DIR --out_file_format array_record`
(TensorFlow needed for that step only). Images are read undecoded and go through the same
decoding and preprocessing as every other source.
"""

from __future__ import annotations

import os

import numpy as np

from .pipeline import RandomAccessSource

# rfdit's data set name -> the TFDS builder the Flax original read
TFDS_NAMES = {"imagenet256": "imagenet2012", "imagenet128": "imagenet2012", "celebahq256": "celebahq256"}


class TfdsSource(RandomAccessSource):
    """Records of one split of a prepared TFDS build; images stay encoded."""

    def __init__(self, source, where: str, num_classes: int, has_label: bool):
        self.source, self.where, self.num_classes, self.has_label = source, where, num_classes, has_label

    def __len__(self) -> int:
        return len(self.source)

    def fetch(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
        records = self.source.__getitems__([int(i) for i in indices])
        labels = np.array([int(r["label"]) if self.has_label else 0 for r in records], np.int32)
        return [r["image"] for r in records], labels

    def describe(self, index: int) -> str:
        return f"record {index} of {self.where}"


def open_tfds(name: str, data_dir: str | os.PathLike) -> dict[str, TfdsSource]:
    """The splits of the TFDS build behind `name` in `data_dir`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ValueError(
            "--tfds_data_dir needs tensorflow-datasets: `pip install 'rfdit[tfds]'` (TensorFlow is not needed), or "
            "pass --dataset_path with an image folder instead."
        ) from error
    builder = TFDS_NAMES[name]
    try:
        sources = tfds.data_source(builder, data_dir=os.fspath(data_dir), download=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:  # not found, wrong format or broken metadata: tfds raises many types
        raise ValueError(
            f"couldn't open the TFDS build {builder!r} in {os.fspath(data_dir)!r} ({type(error).__name__}: {error}). "
            f"Expected {os.path.join(os.fspath(data_dir), builder, '<version>')} holding ArrayRecord files; convert a "
            "TFRecord build with `tfds convert_format --root_data_dir DIR --out_file_format array_record`."
        ) from error
    if "train" not in sources:
        raise ValueError(f"the TFDS build {builder!r} in {os.fspath(data_dir)!r} has no 'train' split "
                         f"(splits: {list(sources)}).")
    features = sources["train"].dataset_info.features
    if "image" not in features:
        raise ValueError(f"the TFDS build {builder!r} has no 'image' feature (features: {list(features)}).")
    has_label = "label" in features
    num_classes = int(getattr(features["label"], "num_classes", 0) or 0) if has_label else 1
    if has_label and num_classes == 0:
        raise ValueError(f"the 'label' feature of the TFDS build {builder!r} is not a ClassLabel.")
    out = {}
    for split, source in sources.items():
        if len(source) == 0:
            raise ValueError(f"split {split!r} of the TFDS build {builder!r} in {os.fspath(data_dir)!r} is empty.")
        out[split] = TfdsSource(source, f"{builder}/{split} in {os.fspath(data_dir)!r}", num_classes, has_label)
    return out
