"""Latent diffusion on the 1D tokenizer latents: the linear interpolant, its training loss and samplers.

Models live in :mod:`maetok.models.sit` (SiT) and :mod:`maetok.models.lightningdit` (LightningDiT).
"""

from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn
from maetok.diffusion.transport import (
    cosine_direction_loss,
    interpolate,
    sample_time,
    training_loss,
    velocity_target,
    velocity_to_data,
    velocity_to_noise,
    velocity_to_score,
)

__all__ = [
    "cosine_direction_loss",
    "euler_maruyama_sample",
    "euler_sample",
    "interpolate",
    "make_model_fn",
    "sample_time",
    "training_loss",
    "velocity_target",
    "velocity_to_data",
    "velocity_to_noise",
    "velocity_to_score",
]
