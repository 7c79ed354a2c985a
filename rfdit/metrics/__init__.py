"""Metrics: Fréchet distances, FID with the TF Inception graph, and the digits evaluator."""

from .fid import (
    compute_statistics,
    feature_statistics,
    fid_inception,
    frechet_distance,
    load_statistics,
    save_statistics,
)

__all__ = [
    "compute_statistics", "feature_statistics", "fid_inception", "frechet_distance", "load_statistics",
    "save_statistics",
]
