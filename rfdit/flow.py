"""The rectified-flow objective: x_t = (1-t)·x0 + t·x1 with target v = x1 - x0.

t = 0 is noise (x0 ~ N(0, I)) and t = 1 is data (x1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import FlowConfig


def interpolate(x0: Float[Array, "*s"], x1: Float[Array, "*s"], t: Float[Array, ""]) -> Float[Array, "*s"]:
    """The point at time t on the straight line from noise x0 (t=0) to data x1 (t=1)."""
    return (1 - t) * x0 + t * x1


def target_velocity(x0: Float[Array, "*s"], x1: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """dx_t/dt along the straight line: x1 - x0, the same at every t."""
    return x1 - x0


def sample_time(key: PRNGKeyArray, shape: tuple[int, ...], cfg: FlowConfig) -> Float[Array, "..."]:
    """Training times in [0, 1]: uniform, or logit-normal (the original calls it "log-normal")."""
    if cfg.t_sampler == "uniform":
        return jr.uniform(key, shape)
    return jax.nn.sigmoid(cfg.t_mean + cfg.t_std * jr.normal(key, shape))


def drop_labels(key: PRNGKeyArray, labels: Int[Array, " b"], prob: float, null_label: int) -> Int[Array, " b"]:
    """Replace each label by the null label with probability `prob` (for guidance)."""
    drop = jr.bernoulli(key, prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


VelocityFn = Callable[[Float[Array, "H W C"], Float[Array, ""], Int[Array, ""]], Float[Array, "H W O"]]


class FlowDraws(NamedTuple):
    """The randomness of one loss evaluation: times, noise, and labels after dropout."""

    t: Float[Array, " b"]
    x0: Float[Array, "b H W C"]
    labels: Int[Array, " b"]


def draw(
    key: PRNGKeyArray, x1: Float[Array, "b H W C"], labels: Int[Array, " b"], cfg: FlowConfig, num_classes: int
) -> FlowDraws:
    """Draw t, the noise x0 and the label dropout for a batch, each from its own key."""
    time_key, noise_key, label_key = jr.split(key, 3)
    t = sample_time(time_key, (x1.shape[0],), cfg)
    x0 = jr.normal(noise_key, x1.shape, x1.dtype)
    return FlowDraws(t, x0, drop_labels(label_key, labels, cfg.class_dropout_prob, num_classes))


def _check_convention(model) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "time_convention", "rfdit") != "rfdit":
        raise ValueError(
            f"flow_loss trains in rfdit's convention (t=0 noise, v = x1 - x0); this model was trained in the "
            f"{config.time_convention!r} convention. Fine-tuning it would need its own objective."
        )


def loss_given_draws(
    model: VelocityFn, x1: Float[Array, "b H W C"], draws: FlowDraws, cfg: FlowConfig
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The flow-matching MSE for fixed draws (see `flow_loss`)."""
    _check_convention(model)
    t_mix = draws.t if cfg.t_clip_max is None else jnp.minimum(draws.t, cfg.t_clip_max)
    xt = jax.vmap(interpolate)(draws.x0, x1, t_mix)
    target = target_velocity(draws.x0, x1)
    pred = jax.vmap(model)(xt, draws.t, draws.labels)[..., : x1.shape[-1]]
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    aux = {
        "per_example_loss": per_example,
        "t": draws.t,
        "v_abs_mean": jnp.mean(jnp.abs(target)),
        "v_pred_abs_mean": jnp.mean(jnp.abs(pred)),
    }
    return jnp.mean(per_example), aux


def flow_loss(
    model: VelocityFn,
    x1: Float[Array, "b H W C"],
    labels: Int[Array, " b"],
    cfg: FlowConfig,
    num_classes: int,
    *,
    key: PRNGKeyArray,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean squared error between the predicted and the target velocity.

    t ~ the time sampler, x0 ~ N(0, I), labels dropped to the null label with
    probability `class_dropout_prob`; x_t = (1-t)·x0 + t·x1 (formed with min(t, t_clip_max)
    when the original's clip is on, while the model sees the raw t); target x1 - x0.
    Returns the loss and auxiliaries: per-example loss, t, and velocity magnitudes.
    Only the first C output channels are the velocity (a learn_sigma model has 2C).
    """
    _check_convention(model)
    return loss_given_draws(model, x1, draw(key, x1, labels, cfg, num_classes), cfg)
