"""rfdit: rectified-flow image generation with a Diffusion Transformer, in JAX/Equinox."""

from . import flow
from .config import PRESETS, DiTConfig, FlowConfig, OptimConfig, SamplerConfig
from .nn import DiT, StableVAE, VAEConfig, count_params
from .sampling import sample, solve, time_grid
from .sde import Diffusion
from .train import TrainState, TrainStep, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "DiT", "Diffusion", "StableVAE", "VAEConfig", "DiTConfig", "FlowConfig", "OptimConfig", "SamplerConfig", "TrainState", "TrainStep",
    "count_params", "flow", "make_optimizer", "sample", "solve", "time_grid",
]
