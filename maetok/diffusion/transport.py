"""The linear interpolant (rectified-flow / SiT "linear" path) and the velocity-matching training loss.

Convention (paper §4.1, METHOD.md §3): ``t = 0`` is data, ``t = 1`` is noise,

    x_t = (1 - t) * x0 + t * eps,        eps ~ N(0, I),
    v   = d x_t / d t = eps - x0          (the regression target of the model).

For the model's optimum ``v(x_t, t) = E[eps - x0 | x_t]`` the posterior means follow from
``x_t = (1 - t) E[x0|x_t] + t E[eps|x_t]``:

    E[x0  | x_t] = x_t - t * v
    E[eps | x_t] = x_t + (1 - t) * v
    score(x_t, t) = grad log p_t(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t) * v) / t.

All tensors are ``(B, ...)`` (latents ``(B, L, C)``); times are ``(B,)`` floats broadcast over the rest.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from maetok.global_batch import SampleRandom, require_draws

__all__ = [
    "TIME_SAMPLINGS",
    "expand_time",
    "interpolate",
    "velocity_target",
    "velocity_to_data",
    "velocity_to_noise",
    "velocity_to_score",
    "sample_time",
    "cosine_direction_loss",
    "training_loss",
]

TIME_SAMPLINGS = ("uniform", "lognormal")


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` times -> ``(B, 1, ..., 1)`` broadcastable to ``like`` ``(B, ...)``, in ``like``'s dtype."""
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"times must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise``; x0, noise ``(B, ...)``, t ``(B,)`` in ``[0, 1]``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    t = expand_time(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """``v = noise - x0`` (time derivative of :func:`interpolate`)."""
    return noise - x0


def velocity_to_data(velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Data prediction ``E[x0 | x_t] = x_t - t v``."""
    return x_t - expand_time(t, x_t) * velocity


def velocity_to_noise(velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Noise prediction ``E[eps | x_t] = x_t + (1 - t) v``."""
    return x_t + (1 - expand_time(t, x_t)) * velocity


def velocity_to_score(velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Score ``grad log p_t(x_t) = -(x_t + (1 - t) v) / t`` (undefined at ``t = 0``)."""
    return -velocity_to_noise(velocity, x_t, t) / expand_time(t, x_t)


def sample_time(
    batch_size: int,
    time_sampling: str = "uniform",
    draws: Optional[SampleRandom] = None,
    device: Optional[torch.device | str] = None,
    time_eps: float = 0.0,
    lognormal_mean: float = 0.0,
    lognormal_std: float = 1.0,
) -> Tensor:
    """Training times ``(batch_size,)`` float32 on ``device``, one per sample from its stream ``time`` of
    ``draws`` (the batch's :class:`~maetok.global_batch.SampleRandom`, required).

    ``"uniform"``: ``U[time_eps, 1 - time_eps)``. ``"lognormal"`` (logit-normal, SiT/SD3/EDM style):
    ``sigmoid(n)``, ``n ~ N(lognormal_mean, lognormal_std^2)``, clamped to ``[max(time_eps, 1e-5),
    1 - max(time_eps, 1e-5)]`` so it stays strictly inside ``(0, 1)``.
    """
    if not 0.0 <= time_eps < 0.5:
        raise ValueError(f"time_eps must be in [0, 0.5), got {time_eps}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; expected one of {TIME_SAMPLINGS}")
    if time_sampling == "lognormal" and lognormal_std <= 0:
        raise ValueError(f"lognormal_std must be positive, got {lognormal_std}")
    draws = require_draws(draws, batch_size, "sample_time")
    if time_sampling == "uniform":
        return time_eps + (1.0 - 2.0 * time_eps) * draws.uniform("time", (), device)
    eps = max(time_eps, 1e-5)
    return torch.sigmoid(lognormal_mean + lognormal_std * draws.normal("time", (), device)).clamp(eps, 1.0 - eps)


def cosine_direction_loss(prediction: Tensor, target: Tensor, reduction: str = "token") -> Tensor:
    """LightningDiT's velocity-direction term ``1 - cos(v_pred, v_target)``, averaged to a scalar.

    prediction, target: ``(B, L, C)`` (or ``(B, C)``). ``reduction="token"``: cosine over the channel (last)
    dim of every token, then the mean over tokens and batch; ``"sample"``: cosine of the flattened sample.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if reduction == "token":
        cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1, eps=1e-8)
    elif reduction == "sample":
        cosine = F.cosine_similarity(prediction.flatten(1).float(), target.flatten(1).float(), dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown cosine reduction {reduction!r}; expected 'token' or 'sample'")
    return (1.0 - cosine).mean()


def training_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    y: Optional[Tensor] = None,
    draws: Optional[SampleRandom] = None,
    time_sampling: str = "uniform",
    cosine_loss_weight: float = 0.0,
    cosine_reduction: str = "token",
    time_eps: float = 0.0,
    lognormal_mean: float = 0.0,
    lognormal_std: float = 1.0,
    label_dropout: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Velocity-matching loss for one batch.

    model: called as ``model(x_t, t, y)`` returning ``(B, ...)`` velocities; x0: ``(B, ...)`` clean
    (normalised) latents; y: ``(B,)`` int64 labels or ``None``. ``draws``: the batch's
    :class:`~maetok.global_batch.SampleRandom` (required; the trainer's are keyed by each sample's place in the
    global batch): the time (``time_sampling``, see :func:`sample_time`), the noise ``N(0, I)`` and the label
    dropout of each sample come from its own streams (``time``, ``noise``, ``label_drop``). The labels to drop
    (probability ``label_dropout``, the model's ``class_dropout_prob``) are passed to the model as
    ``force_drop_ids``.

    Returns ``(loss, terms)``: ``loss = mse + cosine_loss_weight * cosine`` (a scalar with grad), where
    ``mse`` is the mean of ``(v_pred - (eps - x0))^2`` over all elements and ``cosine`` is
    :func:`cosine_direction_loss` (only computed when the weight is > 0); ``terms`` holds detached scalars
    ``"loss"``, ``"mse"`` and (if used) ``"cosine"``, plus ``"t_mean"``.
    """
    if cosine_loss_weight < 0:
        raise ValueError(f"cosine_loss_weight must be >= 0, got {cosine_loss_weight}")
    if x0.dim() < 2:
        raise ValueError(f"x0 must be (B, ...) latents, got shape {tuple(x0.shape)}")
    draws = require_draws(draws, x0.shape[0], "training_loss")
    t = sample_time(x0.shape[0], time_sampling, draws, x0.device, time_eps, lognormal_mean, lognormal_std)
    noise = draws.normal("noise", x0.shape[1:], x0.device).to(x0.dtype)
    call_kwargs: dict[str, Any] = {}
    if y is not None and label_dropout > 0:
        call_kwargs["force_drop_ids"] = (draws.uniform("label_drop", (), y.device) < label_dropout).long()
    x_t = interpolate(x0, noise, t)
    target = velocity_target(x0, noise)
    prediction = model(x_t, t, y, **call_kwargs)
    if prediction.shape != target.shape:
        raise ValueError(f"model output {tuple(prediction.shape)} does not match the latents {tuple(target.shape)}")
    mse = (prediction.float() - target.float()).pow(2).mean()
    loss = mse
    terms: dict[str, Tensor] = {"mse": mse.detach()}
    if cosine_loss_weight > 0:
        cosine = cosine_direction_loss(prediction, target, cosine_reduction)
        loss = loss + cosine_loss_weight * cosine
        terms["cosine"] = cosine.detach()
    terms["loss"] = loss.detach()
    terms["t_mean"] = t.mean().detach()
    return loss, terms
