"""The interface every auxiliary-decoder target implements, and the registry that builds them by name."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from maetok.errors import ConfigError


class FeatureTarget(nn.Module):
    """A frozen feature extractor whose per-patch features an auxiliary decoder learns to predict.

    Subclasses set ``name``, ``dim`` (features per token, ``D^j``) and ``loss`` (``"mse"`` or ``"cosine"``)
    and implement :meth:`forward`. Targets hold no trainable parameters and are never saved with the
    tokenizer: they are rebuilt from the config.
    """

    name: str = "target"
    dim: int = 0
    loss: str = "mse"

    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """images: ``(B, C, H, W)`` in [-1, 1]; returns ``(B, grid_h * grid_w, dim)`` row-major on the
        tokenizer's patch grid."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "FeatureTarget":
        # Teachers stay in eval mode whatever the tokenizer does.
        return super().train(False)


TargetFactory = Callable[..., FeatureTarget]
_TARGETS: dict[str, TargetFactory] = {}


def register_target(name: str) -> Callable[[TargetFactory], TargetFactory]:
    """Decorator: register a factory ``f(image_size, patch_size, in_channels, **options) -> FeatureTarget``."""

    def wrap(factory: TargetFactory) -> TargetFactory:
        _TARGETS[name] = factory
        return factory

    return wrap


def build_target(name: str, image_size: int, patch_size: int, in_channels: int, **options) -> FeatureTarget:
    """Build a registered target by name; a clear error lists the known names."""
    if name not in _TARGETS:
        raise ConfigError(f"unknown auxiliary target {name!r}; known targets: {sorted(_TARGETS)}")
    target = _TARGETS[name](image_size=image_size, patch_size=patch_size, in_channels=in_channels, **options)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def known_targets() -> list[str]:
    return sorted(_TARGETS)


def resample_to_grid(
    features: Tensor, source_grid: tuple[int, int], grid_size: tuple[int, int], antialias: bool = True
) -> Tensor:
    """Bilinearly resample row-major token features ``(B, h*w, D)`` from ``source_grid`` to ``(B, gh*gw, D)``.

    ``antialias`` (default): along an axis that shrinks, the bilinear filter is widened to the output spacing
    (each output averages the inputs it covers) instead of sampling 2x2 neighbours, which aliases
    high-frequency features; along an axis that grows it is plain bilinear interpolation either way.
    """
    if tuple(source_grid) == tuple(grid_size):
        return features
    b, _, d = features.shape
    fmap = features.transpose(1, 2).reshape(b, d, *source_grid)
    fmap = torch.nn.functional.interpolate(
        fmap.float(), size=tuple(grid_size), mode="bilinear", align_corners=False, antialias=antialias
    )
    return fmap.flatten(2).transpose(1, 2).to(features.dtype)
