"""Samplers for velocity models of the linear interpolant ``x_t = (1 - t) x0 + t eps`` (t=1: noise, t=0: data).

A *model function* maps ``(x (B, ...), t (B,))`` to the velocity ``(B, ...)``; build one from a SiT /
LightningDiT with :func:`make_model_fn` (class labels and classifier-free guidance with a guidance interval
are bound in the closure). Both samplers integrate from ``t = 1`` (``noise``) towards ``t = 0`` (data):

* :func:`euler_sample`: the probability-flow ODE ``dx = v dt`` (LightningDiT's sampler, 250 steps).
* :func:`euler_maruyama_sample`: the reverse SDE with the same marginals (SiT's sampler, 250 steps),
  ``dx = [v - w(t) s(x, t)] dt + sqrt(2 w(t)) dW`` integrated with ``dt < 0``, where the score follows from the
  velocity, ``s = -(x + (1 - t) v) / t``, and ``w(t) = t`` (SiT's ``"sigma"`` diffusion form; the authors'
  MAETok sampler writes the same thing as ``diffusion = 2t``, drift ``v - diffusion / 2 * s``). Time grid
  ``linspace(1, t_end, num_steps)`` followed by one final noise-free step from ``t_end`` to 0, so the model
  is evaluated ``num_steps`` times.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from maetok.diffusion.transport import velocity_to_score

__all__ = ["ModelFn", "make_model_fn", "euler_sample", "euler_maruyama_sample", "DIFFUSION_FORMS"]

ModelFn = Callable[[Tensor, Tensor], Tensor]
DIFFUSION_FORMS = ("sigma", "constant", "linear")


def make_model_fn(
    model: nn.Module,
    y: Optional[Tensor] = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> ModelFn:
    """Bind labels and guidance to a velocity model; returns ``fn(x, t) -> v``.

    model: a :class:`~maetok.models.sit.SiT` / :class:`~maetok.models.lightningdit.LightningDiT` (anything
    with ``forward_with_cfg(x, t, y, cfg_scale, guidance_interval)``; a plain ``model(x, t, y)`` callable
    works when ``cfg_scale == 1``). Put it in eval mode first. y: ``(B,)`` int64 labels, or ``None`` for
    unconditional sampling (an unconditional model, or a conditional one with a null class, which then
    samples from its unconditional branch). Guidance ``u + cfg_scale * (c - u)`` applies only to samples
    whose ``t`` lies in ``guidance_interval``. ``x`` is cast to the model's parameter dtype for the call
    and the velocity back to ``x``'s dtype; ``t`` is passed as float32.
    """
    guided = hasattr(model, "forward_with_cfg")
    if cfg_scale != 1.0 and not guided:
        raise ValueError(f"{type(model).__name__} has no forward_with_cfg: classifier-free guidance is unavailable")
    if cfg_scale != 1.0 and y is None:
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y")
    params = next(iter(model.parameters()), None)
    model_dtype = params.dtype if params is not None else None

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        x_in = x.to(model_dtype) if model_dtype is not None and x.is_floating_point() else x
        t_in = t.to(device=x.device, dtype=torch.float32)
        labels = y.to(x.device) if y is not None else None
        if guided:
            velocity = model.forward_with_cfg(x_in, t_in, labels, cfg_scale, guidance_interval)
        else:
            velocity = model(x_in, t_in, labels)
        return velocity.to(x.dtype)

    return model_fn


def _state(noise: Tensor) -> Tensor:
    # integrate in at least float32 even when the noise (and model) are half precision
    if noise.dtype in (torch.float16, torch.bfloat16):
        return noise.float()
    return noise.clone()


def _progress(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, leave=False)


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    noise: Tensor,
    num_steps: int = 250,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Deterministic Euler integration of ``dx/dt = v(x, t)`` on ``linspace(t_start, t_end, num_steps + 1)``.

    noise: ``(B, ...)`` the state at ``t_start`` (standard normal for ``t_start = 1``). Returns the state at
    ``t_end`` (``(B, ...)``, the noise's dtype): generated (normalised) latents for ``t_end = 0``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0.0 <= t_end <= 1.0 and 0.0 <= t_start <= 1.0):
        raise ValueError(f"t_start {t_start} and t_end {t_end} must lie in [0, 1]")
    x = _state(noise)
    times = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()
    batch = x.shape[0]
    with _progress(num_steps, progress, "euler") as bar:
        for t_cur, t_next in zip(times[:-1], times[1:]):
            t_vec = torch.full((batch,), t_cur, device=x.device, dtype=torch.float32)
            x = x + (t_next - t_cur) * model_fn(x, t_vec).to(x.dtype)
            bar.update(1)
    return x.to(noise.dtype)


def _diffusion_fn(
    diffusion_coef: Union[str, Callable[[float], float]], diffusion_norm: float
) -> Callable[[float], float]:
    if callable(diffusion_coef):
        return lambda t: diffusion_norm * float(diffusion_coef(t))
    if diffusion_coef == "sigma":
        return lambda t: diffusion_norm * t
    if diffusion_coef == "constant":
        return lambda t: diffusion_norm
    if diffusion_coef == "linear":
        return lambda t: diffusion_norm * (1.0 - t)
    raise ValueError(f"unknown diffusion_coef {diffusion_coef!r}; expected one of {DIFFUSION_FORMS} or a callable")


@torch.no_grad()
def euler_maruyama_sample(
    model_fn: ModelFn,
    noise: Tensor,
    num_steps: int = 250,
    t_end: float = 0.04,
    diffusion_coef: Union[str, Callable[[float], float]] = "sigma",
    diffusion_norm: float = 1.0,
    generator: Optional[torch.Generator] = None,
    last_step: str = "drift",
    progress: bool = False,
) -> Tensor:
    """Euler-Maruyama integration of the reverse SDE from ``t = 1`` to ``t = 0``.

    noise: ``(B, ...)`` standard normal state at ``t = 1``. Grid: ``linspace(1, t_end, num_steps)`` then 0.
    Each of the first ``num_steps - 1`` steps (``dt < 0``)::

        v = model_fn(x, t);  s = -(x + (1 - t) v) / t;  w = diffusion_norm * w(t)
        x <- x + (v - w s) dt + sqrt(2 w |dt|) z,   z ~ N(0, I) (from ``generator`` on its device)

    ``diffusion_coef``: ``"sigma"`` ``w(t) = t`` (SiT default), ``"constant"`` ``w = 1``, ``"linear"``
    ``w = 1 - t``, or a callable ``t -> w``. The final step from ``t_end`` to 0 adds no noise:
    ``last_step="drift"`` moves along ``v - w s`` (the authors' sampler), ``"velocity"`` along ``v`` (the
    ODE step, i.e. the posterior mean ``x - t_end v``). Returns ``(B, ...)`` in the noise's dtype.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_end < 1.0:
        raise ValueError(f"t_end must lie in (0, 1) (the score is singular at t=0), got {t_end}")
    if last_step not in ("drift", "velocity"):
        raise ValueError(f"unknown last_step {last_step!r}; expected 'drift' or 'velocity'")
    diffusion = _diffusion_fn(diffusion_coef, diffusion_norm)
    x = _state(noise)
    times = torch.linspace(1.0, t_end, num_steps, dtype=torch.float64).tolist() + [0.0]
    batch = x.shape[0]

    def drift(x_cur: Tensor, t_cur: float) -> tuple[Tensor, Tensor]:
        t_vec = torch.full((batch,), t_cur, device=x_cur.device, dtype=torch.float32)
        velocity = model_fn(x_cur, t_vec).to(x_cur.dtype)
        score = velocity_to_score(velocity, x_cur, t_vec)
        return velocity, velocity - diffusion(t_cur) * score

    with _progress(num_steps, progress, "euler-maruyama") as bar:
        for t_cur, t_next in zip(times[:-2], times[1:-1]):
            dt = t_next - t_cur
            _, d_cur = drift(x, t_cur)
            if generator is not None:
                z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
                z = z.to(device=x.device, dtype=x.dtype)
            else:
                z = torch.randn_like(x)
            w = diffusion(t_cur)
            if w < 0:
                raise ValueError(f"the diffusion coefficient must be >= 0, got {w} at t={t_cur}")
            x = x + d_cur * dt + math.sqrt(2.0 * w * abs(dt)) * z
            bar.update(1)
        t_cur = times[-2]
        velocity, d_cur = drift(x, t_cur)
        x = x + (d_cur if last_step == "drift" else velocity) * (0.0 - t_cur)
        bar.update(1)
    return x.to(noise.dtype)
