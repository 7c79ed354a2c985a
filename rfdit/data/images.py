"""Decoding and ADM/DiT preprocessing of single images, and image-folder listing.

Every image source (Hub rows, files, TFDS records) ends up in `load_image`: decode with
PIL, convert any mode to 8-bit RGB, take the centre square by the short side and resize it
with antialiasing to the target size. A file that PIL cannot read raises here, and the
batch pipeline counts and replaces it.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
from jaxtyping import UInt8
from PIL import Image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def decode(raw: object) -> Image.Image:
    """A fully decoded PIL image from encoded bytes, a file path, a Hub image dict, an array or an image.

    Hub image columns hold `{"bytes": ..., "path": ...}`; bytes win over the path. Decoding
    happens here (not lazily later), so a truncated file raises inside the caller's `try`.
    """
    if isinstance(raw, dict):
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(raw))
    elif isinstance(raw, (str, os.PathLike)):
        with open(raw, "rb") as f:  # read in one go: the thread releases the GIL for the I/O
            image = Image.open(io.BytesIO(f.read()))
    elif isinstance(raw, np.ndarray):
        image = Image.fromarray(raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw)
    elif isinstance(raw, Image.Image):
        image = raw
    else:
        raise TypeError(f"can't decode an image from a {type(raw).__name__}; expected bytes, a path or an array.")
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB.

    Grayscale (L, 1) is replicated, CMYK/YCbCr/P are converted by PIL, transparency (RGBA,
    LA, P with a transparent colour) is composited onto white, and 16/32-bit grayscale is
    scaled down to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or values.max(initial=0.0) > 255.0:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, image_size: int) -> Image.Image:
    """ADM/DiT preprocessing: the centre square (side = the short side), resized to `image_size`.

    Pillow's bicubic resize widens its kernel by the downscaling factor, so it is antialiased
    for any factor (ADM reached the same by halving with a box filter before its bicubic step).
    """
    width, height = image.size
    if (width, height) == (image_size, image_size):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == image_size:
        return image.crop(box)
    return image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC, box=box)


def load_image(raw: object, image_size: int) -> UInt8[np.ndarray, "size size 3"]:
    """Decode, convert to RGB and crop/resize one image: uint8 (image_size, image_size, 3)."""
    image = center_crop_resize(to_rgb(decode(raw)), image_size)
    return np.asarray(image, dtype=np.uint8)


def to_float(images: UInt8[np.ndarray, "*batch h w c"]) -> np.ndarray:
    """uint8 pixels as float32 in [-1, 1] (v / 127.5 - 1)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(directory: str) -> list[str]:
    """Image files below `directory` (recursively, hidden entries skipped), sorted."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in files if _is_image_file(name))
    return sorted(found)


def list_image_folder(path: str | os.PathLike) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """The files, labels and class names of an image folder.

    Two layouts: class subfolders (`DIR/<class>/**/<image>`, the ImageNet train layout; labels
    follow the sorted folder names) or a flat folder of images (one class, label 0). Files are
    recognised by extension; whether they decode is found out later, in the pipeline.

    Returns:
        paths (sorted within each class), labels int32 (N,), class names (empty for a flat folder).
    """
    root = pathlib.Path(path)
    if not root.is_dir():
        raise ValueError(f"--dataset_path {str(path)!r} is not a folder; expected a folder of images or of class "
                         "subfolders.")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    top_files = [e.path for e in entries if e.is_file() and _is_image_file(e.name)]
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    class_files = {d.name: _images_under(d.path) for d in subdirs}
    class_files = {name: files for name, files in class_files.items() if files}
    if not class_files:
        if not top_files:
            raise ValueError(
                f"found no images in {str(root)!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, also one level "
                "of class subfolders down); check --dataset_path."
            )
        return top_files, np.zeros(len(top_files), np.int32), ()
    if top_files:
        raise ValueError(
            f"{str(root)!r} mixes {len(top_files)} image files (e.g. {os.path.basename(top_files[0])!r}) with class "
            f"subfolders ({', '.join(list(class_files)[:3])}, ...); put every image in a class folder, or use a flat "
            "folder of images only."
        )
    empty = [d.name for d in subdirs if d.name not in class_files]
    if empty:
        raise ValueError(
            f"class folder(s) {', '.join(repr(e) for e in empty[:5])} in {str(root)!r} hold no images; remove them "
            "(labels follow the sorted folder names, so an empty class would shift them)."
        )
    names = tuple(class_files)
    paths = [p for name in names for p in class_files[name]]
    labels = np.concatenate([np.full(len(class_files[name]), i, np.int32) for i, name in enumerate(names)])
    return paths, labels, names
