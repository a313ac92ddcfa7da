"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant, "v0.1" linear heads).

``d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f_l(x) / ||f_l(x)||_c - f_l(y) / ||f_l(y)||_c)^2`` over the five
VGG16 taps relu1_2 .. relu5_3, with channel-wise unit normalisation (``x / (||x|| + 1e-10)``) and the
learned non-negative head weights ``w_l`` (1x1 convs without bias).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from maetok.assets import LPIPS_HEAD_CHANNELS, PathLike, load_lpips_state_dict
from maetok.losses.vgg import LPIPS_TAPS, VGG16Features

_NORM_EPS = 1e-10


def _unit_normalize(features: Tensor) -> Tensor:
    """Divide each spatial position's channel vector by its L2 norm (+1e-10). ``(B, C, H, W)``."""
    norm = torch.sqrt(torch.sum(features * features, dim=1, keepdim=True))
    return features / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance.

    forward(x, y): images ``(B, C, H, W)`` in [-1, 1] with C in {1, 3} (1-channel images are repeated to 3);
    H, W >= 16. Returns the per-sample distance ``(B,)`` (float32, spatial average as lpips' default).
    Gradients flow to the inputs; the module's own parameters are frozen and it always stays in eval mode.

    ``weights``: optional path for :func:`maetok.assets.ensure_lpips_weights` (default: packaged copy).
    ``pretrained=False`` keeps random weights (only for tests of code that needs *a* perceptual module).
    """

    def __init__(self, weights: Optional[PathLike] = None, pretrained: bool = True):
        super().__init__()
        self.vgg = VGG16Features(LPIPS_TAPS)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_HEAD_CHANNELS)
        if pretrained:
            state = load_lpips_state_dict(weights)
            self.load_state_dict({k: v for k, v in state.items() if k.startswith(("vgg.", "heads."))})
        else:
            for head in self.heads:  # random but non-negative, like trained heads
                nn.init.uniform_(head.weight, 0.0, 0.1)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects images (B, 1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 pixels, got {tuple(x.shape[-2:])}")
        batch = x.shape[0]
        features = self.vgg(torch.cat([x, y], dim=0))
        distance = x.new_zeros(batch, dtype=torch.float32)
        for feature, head in zip(features, self.heads):
            feature = feature.float()
            diff = (_unit_normalize(feature[:batch]) - _unit_normalize(feature[batch:])) ** 2
            # elementwise weighted channel sum == the 1x1 head conv, kept in float32 under autocast
            weighted = (diff * head.weight.float().view(1, -1, 1, 1)).sum(dim=1)
            distance = distance + weighted.mean(dim=(1, 2))
        return distance


def ramp_weight(step: int, start: int = 0, warmup: int = 0, weight: float = 1.0) -> float:
    """Loss weight with a start gate and a linear warm-up.

    0 for ``step < start``; then ``weight * min(1, (step - start + 1) / warmup)`` (so the first active step
    already contributes ``weight / warmup`` and the full weight is reached at ``step = start + warmup - 1``);
    ``weight`` from ``start`` on when ``warmup <= 0``.
    """
    if step < start:
        return 0.0
    if warmup <= 0:
        return float(weight)
    return float(weight) * min(1.0, (step - start + 1) / warmup)
