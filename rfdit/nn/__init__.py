"""Neural network modules (Equinox, channels-last)."""

from .dit import DiT, DiTBlock, count_params, sincos_pos_embed, timestep_features, with_compute_dtype

__all__ = ["DiT", "DiTBlock", "count_params", "sincos_pos_embed", "timestep_features", "with_compute_dtype"]
