"""Neural network modules (Equinox, channels-last)."""

from .dit import DiT, DiTBlock, sincos_pos_embed, timestep_features, with_policy
from .inception import InceptionV3, convert_inception_weights, load_inception
from .layers import count_params
from .policy import ExecutionPolicy, resolve_policy
from .vae import AutoencoderKL, StableVAE, VAEConfig, load_diffusers_weights

__all__ = [
    "AutoencoderKL", "StableVAE", "VAEConfig", "load_diffusers_weights",
    "DiT", "DiTBlock", "InceptionV3", "convert_inception_weights", "count_params", "load_inception",
    "sincos_pos_embed", "timestep_features", "with_policy", "ExecutionPolicy", "resolve_policy",
]
