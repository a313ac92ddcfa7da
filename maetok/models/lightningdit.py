"""LightningDiT on the 1D MAETok latents (paper Table 9).

Same interface as :class:`maetok.models.sit.SiT` (``forward(x, t, y)`` -> velocity ``(B, L, C)``,
``forward_with_cfg``), with LightningDiT's block design: SwiGLU MLP (``int(2/3 * 4 * width)`` hidden units),
RMSNorm (learnable scale) instead of LayerNorm, RMS qk-norm, 1D rotary position embedding on the
token index inside attention (no absolute position embedding), adaLN-Zero conditioning, patch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from maetok.models.blocks import Rope, rope_angles_1d, rope_from_angles
from maetok.models.sit import AdaLNBlock, AdaLNVelocityTransformer, FinalLayer, _config_with

__all__ = ["LIGHTNINGDIT_PRESETS", "LightningDiTConfig", "LightningDiT", "build_lightningdit"]

# (width, depth, num_heads); mlp ratio 4 for all.
LIGHTNINGDIT_PRESETS: dict[str, dict[str, Any]] = {
    "LightningDiT-B": dict(width=768, depth=12, num_heads=12),
    "LightningDiT-L": dict(width=1024, depth=24, num_heads=16),
    "LightningDiT-XL": dict(width=1152, depth=28, num_heads=16),
}


@dataclass
class LightningDiTConfig:
    """Architecture of LightningDiT on 1D latents. Defaults: LightningDiT-XL on 128 x 32 latents, 1000
    classes. ``num_classes=0`` builds an unconditional model. ``rope_theta``: base of the 1D RoPE
    frequencies over the token index (the rotated dimension is the full head dimension)."""

    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    latent_dim: int = 32
    num_latent_tokens: int = 128
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    qk_norm: bool = True
    rope_theta: float = 10000.0
    frequency_dim: int = 256

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        name = type(self).__name__
        for field_name in ("width", "depth", "num_heads", "latent_dim", "num_latent_tokens", "frequency_dim"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{name}.{field_name} must be positive, got {getattr(self, field_name)}")
        if self.width % self.num_heads:
            raise ValueError(f"{name}.width {self.width} is not divisible by num_heads {self.num_heads}")
        if (self.width // self.num_heads) % 2:
            raise ValueError(f"{name}: the head dimension {self.width // self.num_heads} must be even for RoPE")
        if self.mlp_ratio <= 0:
            raise ValueError(f"{name}.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_classes < 0:
            raise ValueError(f"{name}.num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"{name}.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.rope_theta <= 1.0:
            raise ValueError(f"{name}.rope_theta must be > 1, got {self.rope_theta}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LightningDiTConfig":
        """``LightningDiTConfig.from_preset("LightningDiT-XL")``; presets in :data:`LIGHTNINGDIT_PRESETS`."""
        if name not in LIGHTNINGDIT_PRESETS:
            raise ValueError(f"unknown LightningDiT preset {name!r}; known: {sorted(LIGHTNINGDIT_PRESETS)}")
        return _config_with(cls, {**LIGHTNINGDIT_PRESETS[name], **overrides})


class LightningDiT(AdaLNVelocityTransformer):
    """LightningDiT velocity model on ``(B, L, C)`` latents. See the module docstring and
    :meth:`AdaLNVelocityTransformer.forward` / :meth:`~AdaLNVelocityTransformer.forward_with_cfg`."""

    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self._build_common(
            config.width,
            config.latent_dim,
            config.num_latent_tokens,
            config.num_classes,
            config.class_dropout_prob,
            config.frequency_dim,
        )
        head_dim = config.width // config.num_heads
        angles = rope_angles_1d(torch.arange(config.num_latent_tokens), head_dim, config.rope_theta)
        rope_cos, rope_sin = rope_from_angles(angles)  # (L, head_dim) each
        # recomputed at construction, so not stored in checkpoints
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.blocks = nn.ModuleList(
            AdaLNBlock(config.width, config.num_heads, config.mlp_ratio, "rmsnorm", "swiglu", config.qk_norm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.width, config.latent_dim, "rmsnorm")
        self.initialize_weights()

    def _rope(self) -> Optional[Rope]:
        return self.rope_cos, self.rope_sin


def build_lightningdit(preset: str = "LightningDiT-XL", **overrides: Any) -> LightningDiT:
    """``build_lightningdit("LightningDiT-B", num_classes=0)``."""
    return LightningDiT(LightningDiTConfig.from_preset(preset, **overrides))

