"""The distribution of a tokenizer's latents ``(B, L, H)``, with the interface of diffusers'
``DiagonalGaussianDistribution``: what ``MAETok.encode_distribution`` and the diffusers wrapper's
``encode(x).latent_dist`` return. (Outside :mod:`maetok.models`, whose draws are all keyed per sample: diffusers'
interface samples from a ``torch.Generator``.)"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["LatentDistribution"]


class LatentDistribution:
    """The encoder's distribution over latents ``(B, L, H_lat)``, with the interface of diffusers'
    ``DiagonalGaussianDistribution`` (``AutoencoderKL.encode(x).latent_dist``): ``sample(generator)``, ``mode()``,
    ``kl(other)`` and ``nll(sample)``, the last two summed over every non-batch dimension, ``(B,)``.

    A VAE's diagonal Gaussian ``N(mean, exp(logvar))``; with ``logvar=None`` (AE / MAETok) a point mass on ``mean``
    (``deterministic``: zero variance, ``sample() == mode()``, ``kl() == 0``, ``logvar`` -inf)."""

    def __init__(self, mean: Tensor, logvar: Optional[Tensor] = None):
        self.mean = mean  # (B, L, H_lat)
        self.deterministic = logvar is None
        self.logvar = torch.full_like(mean, float("-inf")) if logvar is None else logvar
        self.var = torch.exp(self.logvar)  # zeros when deterministic
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None) -> Tensor:
        """``mean + std * noise``; the noise ``(B, L, H_lat)`` in the mean's dtype from ``generator`` (one, drawn on
        its device, or one per sample, as diffusers' ``randn_tensor``). A point mass returns its mean."""
        if self.deterministic:
            return self.mean
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if len(generators) not in (1, self.mean.shape[0]):
            raise ValueError(f"pass one generator or one per sample ({self.mean.shape[0]}), got {len(generators)}")
        shape = (self.mean.shape[0] // len(generators), *self.mean.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=g, device=g.device if g is not None else self.mean.device,
                                       dtype=self.mean.dtype).to(self.mean.device) for g in generators])
        return self.mean + self.std * noise

    def kl(self, other: Optional["LatentDistribution"] = None) -> Tensor:
        """``KL(self || other)`` (``other`` default ``N(0, I)``) per sample ``(B,)``; zeros for a point mass."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        if other is None:
            kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        else:
            kl = 0.5 * ((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar
                        + other.logvar)
        return kl.flatten(1).sum(dim=1)

    def nll(self, sample: Tensor, dims: Optional[Sequence[int]] = None) -> Tensor:
        """Negative log-likelihood of ``sample`` summed over ``dims`` (default every non-batch dimension); zeros for a
        point mass (as diffusers)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        dims = list(dims) if dims is not None else list(range(1, self.mean.dim()))
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)
