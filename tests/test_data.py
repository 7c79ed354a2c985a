"""The data pipeline: every source format, bad data, determinism, sharding, resume, and the CLI on each."""

import io
import json
import math
import os
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from rfdit.data import DecodedBatches, StreamBatches, load_dataset
from rfdit.data.images import center_crop_resize, list_image_folder, load_image, to_rgb
from rfdit.data.pipeline import FileSource

BATCH = 8
TRAIN_ROWS = 24  # three global batches of 8 per epoch
CORRUPT_FILES = 3


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(rng, size: int, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_hub_parquet(path: pathlib.Path, rows: dict, features) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def _hub_rows(rng, count: int, size: int, image_column: str, label_column: str, num_classes: int, gray_every=0):
    images = []
    for i in range(count):
        gray = gray_every and i % gray_every == 0  # tiny-imagenet has grayscale images among RGB ones
        images.append({"bytes": _png(_noise(rng, size, 1 if gray else 3)), "path": None})
    return {image_column: images, label_column: [int(x) for x in rng.integers(0, num_classes, count)]}


def _write_image_folder(root: pathlib.Path, rng) -> None:
    """Three classes; odd modes and sizes; three corrupt files and a stray non-image file."""
    modes = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"]
    sizes = [(16, 16), (40, 24), (12, 12), (24, 40), (64, 48), (16, 16), (20, 20), (33, 17)]
    for name in ("cat", "dog", "eel"):
        folder = root / name
        folder.mkdir(parents=True)
        for i, (mode, (w, h)) in enumerate(zip(modes, sizes, strict=True)):
            rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if mode == "I;16":
                image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
            elif mode == "P":
                image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
            else:
                image = rgb.convert(mode)
            image.save(folder / f"{i:02d}.{'jpg' if mode == 'CMYK' else 'png'}")
    good = root / "cat" / "00.png"
    (root / "cat" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "dog" / "garbage.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "eel" / "empty.jpeg").write_bytes(b"")
    (root / "eel" / "notes.txt").write_text("not an image")


def _write_tfds_build(data_dir: pathlib.Path, rng) -> None:
    """A `celebahq256` build in ArrayRecord format, written without TensorFlow."""
    import tensorflow_datasets as tfds

    images = [Image.fromarray(_noise(rng, 24)) for _ in range(16)]

    class Celebahq256(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                                   "label": tfds.features.ClassLabel(num_classes=1)})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):
                yield i, {"image": image, "label": 0}

    Celebahq256(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> pathlib.Path:
    import datasets

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cifar = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split, count in (("train", TRAIN_ROWS), ("test", 8)):
        _write_hub_parquet(root / "cifar10" / "plain_text" / f"{split}-00000-of-00001.parquet",
                           _hub_rows(rng, count, 32, "img", "label", 10), cifar)
    tiny = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=200)})
    for split, count in (("train", TRAIN_ROWS), ("valid", 8)):
        _write_hub_parquet(root / "tiny" / "data" / f"{split}-00000-of-00001-0123abcd.parquet",
                           _hub_rows(rng, count, 64, "image", "label", 200, gray_every=3), tiny)
    c100 = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100),
                              "coarse_label": datasets.ClassLabel(num_classes=20)})
    parts = {}
    for split, count in (("train", TRAIN_ROWS), ("test", 8)):
        rows = _hub_rows(rng, count, 32, "img", "fine_label", 100)
        rows["coarse_label"] = [label // 5 for label in rows["fine_label"]]
        parts[split] = datasets.Dataset.from_dict(rows, features=c100)
    datasets.DatasetDict(parts).save_to_disk(str(root / "cifar100_saved"))
    _write_image_folder(root / "folder", rng)
    try:
        _write_tfds_build(root / "tfds", rng)
    except ImportError:
        pass
    return root


def _tfds_or_skip(data_root: pathlib.Path) -> pathlib.Path:
    if not (data_root / "tfds").is_dir():
        pytest.skip("tensorflow-datasets is not installed (`pip install 'rfdit[tfds]'`; it needs no TensorFlow)")
    return data_root / "tfds"


def _collect(iterator, count):
    return [next(iterator) for _ in range(count)]


# Preprocessing, against closed forms


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),  # fully transparent: the white background
        ("LA", (100, 255), (100, 100, 100)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_to_rgb_converts_modes(mode, value, expected):
    image = Image.new(mode, (4, 3), value)
    out = np.asarray(to_rgb(image))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(np.array(expected, np.uint8), out.shape))


def test_to_rgb_converts_palette_images():
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.full((2, 2, 3), [10, 20, 30], np.uint8))


def test_center_crop_resize_keeps_the_centre_square():
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20] = (0, 0, 255)
    pixels[:, 20:40] = (255, 0, 0)  # the centre 20×20 square
    pixels[:, 40:] = (0, 255, 0)
    out = np.asarray(center_crop_resize(Image.fromarray(pixels), 10))
    assert out.shape == (10, 10, 3)
    # away from the square's left and right edges, the kernel sees only the red square
    np.testing.assert_array_equal(out[:, 2:8], np.full((10, 6, 3), (255, 0, 0), np.uint8))


def test_load_image_resizes_with_antialiasing():
    # a fine checkerboard averages to mid-grey when downscaled with antialiasing
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = load_image(_png(board), 8)
    assert out.shape == (8, 8, 3)
    assert np.all(np.abs(out.astype(int) - 127.5) < 4)


# Image folders


def test_list_image_folder_reads_class_subfolders(data_root):
    paths, labels, names = list_image_folder(data_root / "folder")
    assert names == ("cat", "dog", "eel")
    assert len(paths) == 3 * 8 + CORRUPT_FILES  # the .txt file is not listed
    np.testing.assert_array_equal(np.bincount(labels), [9, 9, 9])


def test_list_image_folder_reads_a_flat_folder(tmp_path):
    for i in range(3):
        Image.new("RGB", (5, 5)).save(tmp_path / f"{i}.png")
    paths, labels, names = list_image_folder(tmp_path)
    assert len(paths) == 3 and names == () and not labels.any()


def test_list_image_folder_rejects_an_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="found no images"):
        load_dataset("imagefolder", batch_size=2, path=str(tmp_path), image_size=8)


def test_decoded_batches_skip_and_count_corrupt_files(data_root):
    data = load_dataset("imagefolder", batch_size=9, path=str(data_root / "folder"), image_size=16, prefetch=0)
    assert (data.image_size, data.channels, data.num_classes) == (16, 3, 3)
    batches = _collect(data.batches(0), 2 * data.train.steps_per_epoch)  # two epochs, nothing decoded ahead
    for images, labels in batches:
        assert images.shape == (9, 16, 16, 3) and images.dtype == np.float32 and labels.dtype == np.int32
        assert np.all(np.isfinite(images)) and images.min() >= -1 and images.max() <= 1
        assert labels.min() >= 0 and labels.max() < 3
    stats = data.stats()
    assert stats["corrupt_images"] == CORRUPT_FILES  # each bad file counted once, though seen every epoch
    assert stats["substituted_examples"] == 2 * CORRUPT_FILES
    assert len(data.eval_images) == 3 * 8 and np.all(np.isfinite(data.eval_images))


# Hugging Face layouts


@pytest.mark.parametrize("name, folder, size, classes", [("cifar10", "cifar10", 32, 10),
                                                        ("tiny-imagenet", "tiny", 64, 200),
                                                        ("cifar100", "cifar100_saved", 32, 100)])
def test_load_dataset_reads_hub_layouts(data_root, name, folder, size, classes):
    data = load_dataset(name, batch_size=BATCH, path=str(data_root / folder))
    assert (data.image_size, data.channels, data.num_classes) == (size, 3, classes)
    assert data.train.steps_per_epoch == TRAIN_ROWS // BATCH
    images, labels = next(data.batches(0))
    assert images.shape == (BATCH, size, size, 3) and labels.shape == (BATCH,)
    assert len(data.eval_images) == 8  # the test/valid split
    assert data.stats()["corrupt_images"] == 0


def test_load_dataset_converts_grayscale_rows_to_rgb(data_root):
    import pyarrow.parquet as pq

    data = load_dataset("tiny-imagenet", batch_size=BATCH, path=str(data_root / "tiny"))
    table = pq.read_table(next((data_root / "tiny" / "data").glob("valid-*.parquet")))
    first = Image.open(io.BytesIO(table.column("image")[0].as_py()["bytes"]))
    assert first.mode == "L"
    gray = np.asarray(first, np.float32) / 127.5 - 1
    matches = [np.allclose(image, gray[..., None]) for image in data.eval_images]
    assert any(matches)


def test_load_dataset_names_a_missing_column(data_root, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    _write_hub_parquet(tmp_path / "train-00000-of-00001.parquet",
                       _hub_rows(np.random.default_rng(1), 8, 32, "image", "label", 10), features)
    with pytest.raises(ValueError, match="no column 'img'"):
        load_dataset("cifar10", batch_size=BATCH, path=str(tmp_path))


def test_load_dataset_rejects_out_of_range_labels(tmp_path):
    import datasets

    rows = _hub_rows(np.random.default_rng(2), 8, 32, "img", "label", 10)
    rows["label"][5] = 10
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    _write_hub_parquet(tmp_path / "plain_text" / "train-00000-of-00001.parquet", rows, features)
    with pytest.raises(ValueError, match=r"label 10 \(row 5.*outside \[0, 10\)"):
        load_dataset("cifar10", batch_size=BATCH, path=str(tmp_path))


def test_load_dataset_offline_error_is_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="--dataset_path"):
        load_dataset("cifar10", batch_size=BATCH)
    assert time.perf_counter() - start < 3


def test_load_dataset_dead_connection_error_is_fast(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    start = time.perf_counter()
    with pytest.raises(ValueError, match="can't reach the Hugging Face Hub.*--dataset_path"):
        load_dataset("tiny-imagenet", batch_size=BATCH)
    assert time.perf_counter() - start < 7


# Determinism, sharding and resume


def _stream(data_root, **kwargs):
    return load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10"), streaming=True,
                        shuffle_buffer=10, **kwargs)


def test_streaming_reads_local_shards_through_the_shuffle_buffer(data_root):
    data = _stream(data_root)
    assert isinstance(data.train, StreamBatches) and data.train.steps_per_epoch == TRAIN_ROWS // BATCH
    epochs = [np.concatenate([labels for _, labels in _collect(data.batches(e * 3), 3)]) for e in (0, 1)]
    local = load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10"))
    everything = np.sort(local.train.source.labels)
    for labels in epochs:  # each epoch holds every example once
        np.testing.assert_array_equal(np.sort(labels), everything)
    assert not np.array_equal(epochs[0], epochs[1])  # and is shuffled afresh


def test_decoded_batches_are_a_function_of_seed_and_step(data_root):
    def make(seed):
        return load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10"), seed=seed).train

    a, b, c = make(0), make(0), make(1)
    np.testing.assert_array_equal(a.batch(4)[0], b.batch(4)[0])
    assert not np.array_equal(a.indices(4), c.indices(4))
    assert not np.array_equal(a.global_indices(0), a.global_indices(3))  # epochs are reshuffled


@pytest.mark.parametrize("kind", ["folder", "stream"])
def test_batches_resume_exactly_across_an_epoch_boundary(data_root, kind):
    def make():
        if kind == "folder":  # with corrupt files and flips
            return load_dataset("imagefolder", batch_size=9, path=str(data_root / "folder"), image_size=16, seed=3)
        return _stream(data_root, seed=3, image_size=16)

    data = make()
    steps = data.train.steps_per_epoch
    uninterrupted = _collect(data.batches(0), steps + 2)
    resumed = _collect(make().batches(steps - 1), 3)  # the last batch of epoch 0, then epoch 1
    for (x, y), (rx, ry) in zip(uninterrupted[steps - 1 :], resumed):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


@pytest.mark.parametrize("kind", ["arrow", "stream"])
def test_two_processes_get_disjoint_shares_that_cover_the_data(data_root, kind):
    def make(index, count):
        if kind == "arrow":
            return load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10"), seed=5,
                                process_index=index, process_count=count)
        return _stream(data_root, seed=5, process_index=index, process_count=count)

    whole, first, second = make(0, 1), make(0, 2), make(1, 2)
    steps = whole.train.steps_per_epoch
    for step, ((x, y), (x0, y0), (x1, y1)) in enumerate(zip(*(_collect(d.batches(0), steps)
                                                              for d in (whole, first, second)))):
        assert len(x0) == len(x1) == BATCH // 2
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
        if kind == "arrow":
            assert not set(first.train.indices(step)) & set(second.train.indices(step))
    if kind == "arrow":
        seen = np.concatenate([d.train.indices(s) for s in range(steps) for d in (first, second)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(TRAIN_ROWS))


def test_decoded_batches_topology_does_not_change_replacements(data_root):
    paths, labels, _ = list_image_folder(data_root / "folder")
    source = FileSource(paths, labels, 3)
    whole = DecodedBatches(source, 9, image_size=8, seed=1)
    thirds = [DecodedBatches(source, 9, image_size=8, seed=1, process_index=i, process_count=3) for i in range(3)]
    for step in range(whole.steps_per_epoch):
        x, y = whole.batch(step)
        parts = [t.batch(step) for t in thirds]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_flip_false_gives_the_images_as_they_are(data_root):
    def first_batch(flip):
        data = load_dataset("imagefolder", batch_size=9, path=str(data_root / "folder"), image_size=16, flip=flip)
        return data.train.batch(0)[0]

    flipped, plain = first_batch(True), first_batch(False)
    mirrored = [not np.array_equal(a, b) and np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, plain)]
    assert any(mirrored) and all(m or np.array_equal(a, b) for m, a, b in zip(mirrored, flipped, plain))


def test_debug_overfit_repeats_a_few_examples(data_root):
    data = load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10"), debug_overfit=True)
    labels = np.concatenate([y for _, y in _collect(data.batches(0), 4)])
    first = load_dataset("cifar10", batch_size=BATCH, path=str(data_root / "cifar10")).train.source.labels[:8]
    assert set(labels) <= set(first)


def test_load_dataset_checks_the_models_number_of_classes(data_root):
    with pytest.raises(ValueError, match="--model.num_classes 200"):
        load_dataset("tiny-imagenet", batch_size=BATCH, path=str(data_root / "tiny"), num_classes=10)


def test_tfds_build_reads_without_tensorflow(data_root):
    data_dir = _tfds_or_skip(data_root)
    data = load_dataset("celebahq256", batch_size=BATCH, tfds_data_dir=str(data_dir), image_size=16)
    assert (data.image_size, data.num_classes) == (16, 1)
    images, labels = next(data.batches(0))
    assert images.shape == (BATCH, 16, 16, 3) and not labels.any()


# Training through the CLI on each format


def _cli_flags(save_dir: pathlib.Path) -> list[str]:
    return ["--max_steps", "4", "--batch_size", str(BATCH), "--image_size", "16", "--model.hidden_size", "32",
            "--model.depth", "1", "--model.num_heads", "2", "--model.patch_size", "8", "--model.num_classes", "200",
            "--log_interval", "2", "--eval_interval", "1000", "--save_interval", "1000", "--num_samples", "0",
            "--steps_per_call", "1", "--use_stable_vae", "0", "--save_dir", str(save_dir)]


@pytest.mark.parametrize(
    "name, where",
    [
        ("cifar10", "cifar10"),  # Hub parquet shards, cifar10 schema
        ("tiny-imagenet", "tiny"),  # Hub parquet shards, tiny-imagenet schema with grayscale rows
        ("cifar100", "cifar100_saved"),  # a saved `datasets` folder
        ("imagefolder", "folder"),  # class subfolders, odd modes and sizes, corrupt files
        ("celebahq256", "tfds"),  # a TFDS build
    ],
)
def test_train_cli_runs_on_each_format(data_root, tmp_path, name, where):
    from rfdit.experiment import main

    source = ["--tfds_data_dir", str(_tfds_or_skip(data_root))] if where == "tfds" else \
        ["--dataset_path", str(data_root / where)]
    summary = main(["--dataset_name", name, *source, *_cli_flags(tmp_path / "run")])
    assert summary["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_train_cli_offline_error_comes_before_training(tmp_path, monkeypatch):
    from rfdit.experiment import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="--dataset_path"):
        main(["--dataset_name", "cifar10", *_cli_flags(tmp_path / "run")])
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_tiny_imagenet_script_resolves_the_originals_recipe(tmp_path):
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "train_tiny_imagenet.sh"
    env = {**os.environ, "DATA": str(tmp_path), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(script), "--dry_run"], env=env, capture_output=True, text=True, check=True)
    config = json.loads(out.stdout[out.stdout.index("{"):])
    assert (config["dataset_name"], config["dataset_path"]) == ("tiny-imagenet", str(tmp_path))
    assert (config["batch_size"], config["model"]["patch_size"], config["model"]["hidden_size"]) == (64, 8, 768)
    assert config["use_stable_vae"] is False
