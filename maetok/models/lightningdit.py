"""LightningDiT on the 1D MAETok latents (paper Table 9).

Same interface as :class:`maetok.models.sit.SiT` (``forward(x, t, y)`` -> velocity ``(B, L, C)``,
``forward_with_cfg``), with LightningDiT's block design: SwiGLU MLP (``int(2/3 * 4 * width)`` hidden units),
RMSNorm (learnable scale) instead of LayerNorm, RMS qk-norm, 1D rotary position embedding on the
token index inside attention (no absolute position embedding), adaLN-Zero conditioning, patch size 1.
The architecture config and the sizes live in :mod:`maetok.config` (``LightningDiTConfig``, ``DIFFUSION_SIZES``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from maetok.config import LightningDiTConfig, TransformerSize
from maetok.models.blocks import Rope, rope_angles_1d, rope_from_angles
from maetok.models.sit import AdaLNVelocityTransformer

__all__ = ["LIGHTNINGDIT_PRESETS", "LightningDiTConfig", "LightningDiT", "build_lightningdit"]

# The LightningDiT rows of maetok.config.DIFFUSION_SIZES: name -> (width, depth, num_heads).
LIGHTNINGDIT_PRESETS: dict[str, TransformerSize] = LightningDiTConfig.presets()


class LightningDiT(AdaLNVelocityTransformer):
    """LightningDiT velocity model on ``(B, L, C)`` latents. See the module docstring and
    :meth:`AdaLNVelocityTransformer.forward` / :meth:`~AdaLNVelocityTransformer.forward_with_cfg`."""

    config: LightningDiTConfig
    block_norm = "rmsnorm"
    block_mlp = "swiglu"

    def _build_positions(self, config: LightningDiTConfig) -> None:
        head_dim = config.width // config.num_heads
        angles = rope_angles_1d(torch.arange(config.num_latent_tokens), head_dim, config.rope_theta)
        rope_cos, rope_sin = rope_from_angles(angles)  # (L, head_dim) each
        # recomputed at construction, so not stored in checkpoints
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def _rope(self) -> Optional[Rope]:
        return self.rope_cos, self.rope_sin


def build_lightningdit(preset: str = "LightningDiT-XL", **overrides: Any) -> LightningDiT:
    """``build_lightningdit("LightningDiT-B", num_classes=0)``."""
    return LightningDiT(LightningDiTConfig.from_preset(preset, **overrides))
