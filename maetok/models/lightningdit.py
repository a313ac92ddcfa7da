"""LightningDiT on the 1D MAETok latents (paper Table 9).

Same interface as :class:`maetok.models.sit.SiT` (``forward(x, t, y)`` -> velocity ``(B, L, C)``,
``forward_with_cfg``), with LightningDiT's block design: SwiGLU MLP (``int(2/3 * 4 * width)`` hidden units),
RMSNorm (learnable scale) instead of LayerNorm, RMS qk-norm, 1D rotary position embedding on the
token index inside attention (no absolute position embedding), adaLN-Zero conditioning, patch size 1.
The config (``DiffusionModelConfig`` with ``arch="lightningdit"``) and the sizes (``DIFFUSION_SIZES``) live in
:mod:`maetok.config`.
"""

from __future__ import annotations

from typing import Optional

import torch

from maetok.config import DiffusionModelConfig
from maetok.models.blocks import Rope, rope_angles_1d, rope_from_angles
from maetok.models.sit import AdaLNVelocityTransformer

__all__ = ["LightningDiT"]


class LightningDiT(AdaLNVelocityTransformer):
    """LightningDiT velocity model on ``(B, L, C)`` latents. See the module docstring and
    :meth:`AdaLNVelocityTransformer.forward` / :meth:`~AdaLNVelocityTransformer.forward_with_cfg`."""

    block_norm = "rmsnorm"
    block_mlp = "swiglu"

    def _build_positions(self, config: DiffusionModelConfig) -> None:
        head_dim = config.width // config.num_heads
        angles = rope_angles_1d(torch.arange(config.num_latent_tokens), head_dim, config.rope_theta)
        rope_cos, rope_sin = rope_from_angles(angles)  # (L, head_dim) each
        # recomputed at construction, so not stored in checkpoints
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def _rope(self) -> Optional[Rope]:
        return self.rope_cos, self.rope_sin
