"""The digits evaluator: figures for generated 8×8 digits from an independent classifier.

A small MLP (scikit-learn) is trained on the real training split only; it is not the
generator. In its hidden-feature space it gives, for a set of generated images with
their conditioning labels:

- `class_acc`: how often the classifier reads the conditioning label;
- `fd_feat`: the Fréchet distance to the held-out real digits;
- `precision` / `recall`: k-NN manifold precision and recall (k = 3, Kynkäänniemi et
  al. 2019) against the held-out real digits (the stratified 30% split, seed 0).

Two references are computed the same way: real training digits (the floor any
generator can hope for) and a per-class Gaussian fit of the training data (a baseline
any generator must beat). A pixel-space Fréchet distance would not separate them: a
plain Gaussian with the data's mean and covariance scores near the floor there.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import linalg

from ..data.digits import load_digits_split

K_NEAREST = 3
FIGURES = ("class_acc", "fd_feat", "precision", "recall")
"""the names of the figures `DigitsEvaluator.evaluate` returns"""
HIDDEN_UNITS = 64


def frechet_distance_psd(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1-μ2‖² + Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) through symmetric eigendecompositions.

    Tr((Σ1Σ2)^½) = Σ √λ(Σ1^½ Σ2 Σ1^½), which stays real and stable when the
    covariances are singular (ReLU features have dead units).
    """
    w, v = linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_covmean = np.sum(np.sqrt(np.clip(linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    d = np.linalg.norm(features[:, None] - features[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEAREST) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls."""
    real_radii, fake_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(fake, k)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (n_real, n_fake)
    precision = np.mean(np.any(d <= real_radii[:, None], axis=0))
    recall = np.mean(np.any(d <= fake_radii[None, :], axis=1))
    return float(precision), float(recall)


class DigitsEvaluator:
    """Figures for generated digits, from a classifier trained on the real training split."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        data = load_digits_split()
        self.train_images, self.train_labels = data["train_images"], data["train_labels"]
        self.test_images, self.test_labels = data["test_images"], data["test_labels"]
        self.classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=300, random_state=seed)
        self.classifier.fit(self._flat(self.train_images), self.train_labels)
        self.test_accuracy = float(self.classifier.score(self._flat(self.test_images), self.test_labels))
        test_features = self.features(self.test_images)
        self.test_mu, self.test_sigma = test_features.mean(0), np.cov(test_features, rowvar=False)
        self.test_features = test_features

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float64)
        if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
            raise ValueError(f"the digits evaluator expects images (N, 8, 8, 1) in [-1, 1]; got {images.shape}.")
        return np.clip(images, -1.0, 1.0).reshape(len(images), -1)

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's hidden (ReLU) features, (N, HIDDEN_UNITS)."""
        x = self._flat(images)
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length.")
        if not np.isfinite(images).all():
            raise ValueError("generated images contain NaN or inf; the sampler or the model diverged.")
        feats = self.features(images)
        class_acc = float(np.mean(self.classifier.predict(self._flat(images)) == labels))
        fd = frechet_distance_psd(feats.mean(0), np.cov(feats, rowvar=False), self.test_mu, self.test_sigma)
        precision, recall = precision_recall(self.test_features, feats)
        return {"class_acc": class_acc, "fd_feat": fd, "precision": precision, "recall": recall}

    def gaussian_baseline_samples(self, per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Samples of a per-class Gaussian fit (mean and covariance) of the training digits."""
        rng = np.random.default_rng(seed)
        images, labels = [], []
        flat = self._flat(self.train_images)
        for c in range(10):
            x = flat[self.train_labels == c]
            samples = rng.multivariate_normal(x.mean(0), np.cov(x, rowvar=False), size=per_class)
            images.append(samples.reshape(per_class, 8, 8, 1))
            labels.append(np.full(per_class, c))
        return np.concatenate(images).astype(np.float32), np.concatenate(labels)

    @functools.cached_property
    def references(self) -> dict[str, dict[str, float]]:
        """The floor (real training digits) and the per-class Gaussian baseline."""
        rng = np.random.default_rng(0)
        idx = rng.choice(len(self.train_images), size=min(1000, len(self.train_images)), replace=False)
        real = self.evaluate(self.train_images[idx], self.train_labels[idx])
        gaussian = self.evaluate(*self.gaussian_baseline_samples())
        return {"real_train": real, "gaussian_per_class": gaussian}
