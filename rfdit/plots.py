"""Pictures of a run: sample grids (PIL) and curves (matplotlib, headless)."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 in [0, 255]."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_grid(images: np.ndarray, path: str | pathlib.Path, *, scale: int = 1, pad: int = 1) -> pathlib.Path:
    """Save images (rows, cols, H, W, C) in [-1, 1] as one PNG, each upscaled `scale`×."""
    from PIL import Image

    images = to_uint8(images)
    rows, cols, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    elif c != 3:
        raise ValueError(f"save_grid needs 1 or 3 channels; got {c} (decode latents first).")
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            canvas[y : y + h, x : x + w] = images[r, k]
    image = Image.fromarray(canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(metrics_path: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path | None:
    """Plot the training loss (and the EMA-smoothed loss) from metrics.jsonl."""
    rows = [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    plt = _pyplot()
    steps, losses = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1, label="training loss (mean per log interval)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return pathlib.Path(out)


def bar_plot(labels, values, out, *, xlabel: str, ylabel: str, title: str = "") -> pathlib.Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(x) for x in labels], values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return pathlib.Path(out)
