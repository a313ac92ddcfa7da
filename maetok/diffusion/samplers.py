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
  is evaluated ``num_steps`` times. These defaults are the authors' sampler for their released SiT (METHOD.md
  §5); where the authors differ from us it is selectable: guidance on the drift (``cfg_on="drift"``) and a
  float64 state (``state_dtype=torch.float64``).

Guidance on the drift equals guidance on the velocity in exact arithmetic: the drift
``d(v) = v - w s(v) = (1 + w (1 - t) / t) v + (w / t) x`` is affine in ``v`` with the same ``x`` for both
branches, so ``d_u + g (d_c - d_u) = d(v_u + g (v_c - v_u))``; the two differ by rounding only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from maetok.config import CFG_TARGETS, DIFFUSION_FORMS, LAST_STEPS
from maetok.diffusion.transport import velocity_to_score
from maetok.models.sit import apply_guidance

__all__ = ["ModelFn", "GuidedVelocity", "make_model_fn", "euler_sample", "euler_maruyama_sample", "normal_noise",
           "DIFFUSION_FORMS", "Generators", "Progress"]

ModelFn = Callable[[Tensor, Tensor], Tensor]


class GuidedVelocity:
    """A velocity model with its labels and guidance bound: ``fn(x, t) -> v`` (guided), and
    :meth:`split` ``(x, t) -> (cond, uncond or None)`` for samplers that guide another quantity (the drift).
    Built by :func:`make_model_fn`."""

    def __init__(self, model: nn.Module, y: Optional[Tensor], cfg_scale: float, guidance_interval: Sequence[float]):
        guided = hasattr(model, "forward_with_cfg")
        if cfg_scale != 1.0 and not guided:
            raise ValueError(f"{type(model).__name__} has no forward_with_cfg: classifier-free guidance is unavailable")
        if cfg_scale != 1.0 and y is None:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y")
        self.model = model
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self._guided = guided
        params = next(iter(model.parameters()), None)
        self._model_dtype = params.dtype if params is not None else None

    def _inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        x_in = x.to(self._model_dtype) if self._model_dtype is not None and x.is_floating_point() else x
        t_in = t.to(device=x.device, dtype=torch.float32)
        labels = self.y.to(x.device) if self.y is not None else None
        return x_in, t_in, labels

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        x_in, t_in, labels = self._inputs(x, t)
        if self._guided:
            velocity = self.model.forward_with_cfg(x_in, t_in, labels, self.cfg_scale, self.guidance_interval)
        else:
            velocity = self.model(x_in, t_in, labels)
        return velocity.to(x.dtype)

    def guides(self, t: Tensor) -> bool:
        """Whether guidance applies to any sample at times ``t`` ``(B,)``."""
        low, high = self.guidance_interval
        return self.cfg_scale != 1.0 and bool(((t >= low) & (t <= high)).any())

    def split(self, x: Tensor, t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The conditional and unconditional velocities ``(B, ...)`` in ``x``'s dtype; ``uncond`` is None where
        guidance does not apply at ``t`` (then ``cond`` is the velocity)."""
        if not self.guides(t):
            return self(x, t), None
        x_in, t_in, labels = self._inputs(x, t)
        cond, uncond = self.model.forward_pair(x_in, t_in, labels)
        return cond.to(x.dtype), uncond.to(x.dtype)

    def combine(self, cond: Tensor, uncond: Optional[Tensor], t: Tensor) -> Tensor:
        """``uncond + cfg_scale (cond - uncond)`` for the samples whose ``t`` is inside the interval, else
        ``cond`` (any quantity computed alike from both branches, e.g. the drift)."""
        if uncond is None:
            return cond
        return apply_guidance(cond, uncond, t, self.cfg_scale, self.guidance_interval)


def make_model_fn(
    model: nn.Module,
    y: Optional[Tensor] = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> GuidedVelocity:
    """Bind labels and guidance to a velocity model; returns ``fn(x, t) -> v`` (a :class:`GuidedVelocity`).

    model: a :class:`~maetok.models.sit.SiT` / :class:`~maetok.models.lightningdit.LightningDiT` (anything
    with ``forward_with_cfg(x, t, y, cfg_scale, guidance_interval)``; a plain ``model(x, t, y)`` callable
    works when ``cfg_scale == 1``). Put it in eval mode first. y: ``(B,)`` int64 labels, or ``None`` for
    unconditional sampling (an unconditional model, or a conditional one with a null class, which then
    samples from its unconditional branch). Guidance ``u + cfg_scale * (c - u)`` applies only to samples
    whose ``t`` lies in ``guidance_interval``. ``x`` is cast to the model's parameter dtype for the call
    and the velocity back to ``x``'s dtype; ``t`` is passed as float32.
    """
    return GuidedVelocity(model, y, cfg_scale, guidance_interval)


def _state(noise: Tensor, state_dtype: Optional[torch.dtype] = None) -> Tensor:
    # integrate in state_dtype, by default the noise's but at least float32 (half-precision noise and model)
    if state_dtype is not None:
        return noise.to(state_dtype, copy=True)
    if noise.dtype in (torch.float16, torch.bfloat16):
        return noise.float()
    return noise.clone()


#: what a sampler's ``progress`` takes: False (no bar), True (a tqdm bar over its steps), a bar already open
#: (anything with ``update(n)``, e.g. one tqdm over several batches: advanced, left open) or a factory called as
#: ``progress(total=steps)`` that returns a bar (e.g. ``diffusers.DiffusionPipeline.progress_bar``)
Progress = Union[bool, Any]


def _progress(total: int, progress: Progress, description: str) -> ContextManager[Any]:
    """The bar a sampler advances once per model step (see :data:`Progress`), as a context manager."""
    if hasattr(progress, "update"):
        return contextlib.nullcontext(progress)
    if callable(progress):
        return progress(total=total)
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, desc=description, unit="step", leave=False)


#: one ``torch.Generator`` for the whole batch, or one per sample (as diffusers pipelines take them)
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def normal_noise(shape: Sequence[int], generator: Generators, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)`` on ``device``: drawn from ``generator`` on its device (one
    draw of the whole shape), or with a list of ``B`` generators, sample ``i`` from ``generator[i]`` (so a sample
    does not depend on the others in its batch); ``None``: the global generator."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device,
                           dtype=torch.float32).to(device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} samples: pass one per sample, or one")
    draws = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(device=device)
             for g in generator]
    return torch.stack(draws).to(dtype=dtype)


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    noise: Tensor,
    num_steps: int = 250,
    t_start: float = 1.0,
    t_end: float = 0.0,
    progress: Progress = False,
    state_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Deterministic Euler integration of ``dx/dt = v(x, t)`` on ``linspace(t_start, t_end, num_steps + 1)``.

    noise: ``(B, ...)`` the state at ``t_start`` (standard normal for ``t_start = 1``). Returns the state at
    ``t_end`` (``(B, ...)``, the noise's dtype): generated (normalised) latents for ``t_end = 0``. The state
    is integrated in ``state_dtype`` (default: the noise's, at least float32).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0.0 <= t_end <= 1.0 and 0.0 <= t_start <= 1.0):
        raise ValueError(f"t_start {t_start} and t_end {t_end} must lie in [0, 1]")
    x = _state(noise, state_dtype)
    times = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()
    batch = x.shape[0]
    with _progress(num_steps, progress, "euler") as bar:
        for t_cur, t_next in zip(times[:-1], times[1:]):
            t_vec = torch.full((batch,), t_cur, device=x.device, dtype=x.dtype)
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
    generator: Generators = None,
    last_step: str = "drift",
    progress: Progress = False,
    cfg_on: str = "velocity",
    state_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Euler-Maruyama integration of the reverse SDE from ``t = 1`` to ``t = 0``.

    noise: ``(B, ...)`` standard normal state at ``t = 1``. Grid: ``linspace(1, t_end, num_steps)`` then 0.
    Each of the first ``num_steps - 1`` steps (``dt < 0``)::

        v = model_fn(x, t);  s = -(x + (1 - t) v) / t;  w = diffusion_norm * w(t)
        x <- x + (v - w s) dt + sqrt(2 w |dt|) z,   z ~ N(0, I) (from ``generator``: :func:`normal_noise`)

    ``diffusion_coef``: ``"sigma"`` ``w(t) = t`` (SiT default), ``"constant"`` ``w = 1``, ``"linear"``
    ``w = 1 - t``, or a callable ``t -> w``. The final step from ``t_end`` to 0 adds no noise:
    ``last_step="drift"`` moves along ``v - w s`` (the authors' sampler), ``"velocity"`` along ``v`` (the
    ODE step, i.e. the posterior mean ``x - t_end v``). Returns ``(B, ...)`` in the noise's dtype.

    ``cfg_on``: ``"velocity"`` uses ``model_fn``'s (guided) velocity; ``"drift"`` (the authors') computes the
    drift of the conditional and the unconditional velocity (:meth:`GuidedVelocity.split`) and guides the drift
    (a plain callable without ``split`` is used unguided). The state is integrated in ``state_dtype`` (default:
    the noise's, at least float32; the authors use float64); times reach the score in that dtype and the model
    as float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_end < 1.0:
        raise ValueError(f"t_end must lie in (0, 1) (the score is singular at t=0), got {t_end}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; expected one of {LAST_STEPS}")
    if cfg_on not in CFG_TARGETS:
        raise ValueError(f"unknown cfg_on {cfg_on!r}; expected one of {CFG_TARGETS}")
    diffusion = _diffusion_fn(diffusion_coef, diffusion_norm)
    x = _state(noise, state_dtype)
    times = torch.linspace(1.0, t_end, num_steps, dtype=torch.float64).tolist() + [0.0]
    batch = x.shape[0]
    split = getattr(model_fn, "split", None) if cfg_on == "drift" else None

    def drift(x_cur: Tensor, t_cur: float) -> tuple[Tensor, Tensor]:
        """(velocity, SDE drift ``v - w s``) at ``(x_cur, t_cur)``, guided as ``cfg_on`` says."""
        t_vec = torch.full((batch,), t_cur, device=x_cur.device, dtype=x_cur.dtype)
        w = diffusion(t_cur)
        if split is None:
            velocity = model_fn(x_cur, t_vec).to(x_cur.dtype)
            return velocity, velocity - w * velocity_to_score(velocity, x_cur, t_vec)
        cond, uncond = split(x_cur, t_vec)
        d_cond = cond - w * velocity_to_score(cond, x_cur, t_vec)
        if uncond is None:
            return cond, d_cond
        d_uncond = uncond - w * velocity_to_score(uncond, x_cur, t_vec)
        return model_fn.combine(cond, uncond, t_vec), model_fn.combine(d_cond, d_uncond, t_vec)

    with _progress(num_steps, progress, "euler-maruyama") as bar:
        for t_cur, t_next in zip(times[:-2], times[1:-1]):
            dt = t_next - t_cur
            _, d_cur = drift(x, t_cur)
            z = normal_noise(x.shape, generator, x.device, x.dtype)
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
