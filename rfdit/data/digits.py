"""scikit-learn's bundled handwritten digits: 1,797 grayscale 8×8 images, 10 classes.

They ship inside scikit-learn, so nothing is downloaded. Pixels take 17 levels (0–16);
they are scaled to [-1, 1] as v / 8 - 1.
"""

from __future__ import annotations

import numpy as np

HELD_OUT_FRACTION = 0.3
SPLIT_SEED = 0
LEVELS = 17


def load_digits_split() -> dict[str, np.ndarray]:
    """A fixed, stratified 70/30 train/test split (seed 0), images (N, 8, 8, 1) in [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = data.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}
