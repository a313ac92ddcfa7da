"""VGG16 convolutional feature stack (no classifier), as used by LPIPS, the VGG discriminator backbone and
the VGG semantic target.

Input images are in [-1, 1]; they are first mapped by LPIPS' scaling layer ``(x - shift) / scale`` with
``shift = (-0.030, -0.088, -0.188)`` and ``scale = (0.458, 0.448, 0.450)``, which equals ImageNet
mean/std normalisation of ``(x + 1) / 2``. Weights come from :func:`maetok.assets.ensure_lpips_weights`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.assets import VGG16_CONV_CHANNELS, PathLike, load_lpips_state_dict
from maetok.data.images import to_rgb
from maetok.errors import AssetError

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

#: tap name -> index of the conv whose ReLU output it is (0-based among the 13 convs).
VGG16_TAPS = {
    "relu1_1": 0, "relu1_2": 1,
    "relu2_1": 2, "relu2_2": 3,
    "relu3_1": 4, "relu3_2": 5, "relu3_3": 6,
    "relu4_1": 7, "relu4_2": 8, "relu4_3": 9,
    "relu5_1": 10, "relu5_2": 11, "relu5_3": 12,
}
#: downsampling factor of each tap relative to the input.
VGG16_TAP_STRIDES = {name: 2 ** (int(name[4]) - 1) for name in VGG16_TAPS}
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# a 2x2 max-pool follows these conv indices (the last conv of blocks 1-4)
_POOL_AFTER = (1, 3, 6, 9)


class VGG16Features(nn.Module):
    """VGG16 conv layers up to the deepest requested tap; returns the ReLU outputs at ``taps``.

    forward: images ``(B, 3, H, W)`` in [-1, 1] (1-channel inputs are repeated to 3) -> list of feature maps
    ``(B, C_t, H / s_t, W / s_t)`` in the order of ``taps`` (channels/strides in :attr:`channels`,
    :attr:`strides`). Only the convs needed for the deepest tap are built.
    """

    def __init__(self, taps: Sequence[str] = LPIPS_TAPS):
        super().__init__()
        unknown = [t for t in taps if t not in VGG16_TAPS]
        if unknown or not taps:
            raise ValueError(f"unknown VGG16 taps {unknown or list(taps)}; known: {list(VGG16_TAPS)}")
        self.taps = tuple(taps)
        self._tap_indices = [VGG16_TAPS[t] for t in self.taps]
        depth = max(self._tap_indices) + 1
        in_channels = (3,) + VGG16_CONV_CHANNELS[: depth - 1]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1) for c_in, c_out in zip(in_channels, VGG16_CONV_CHANNELS)
        )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return [VGG16_CONV_CHANNELS[i] for i in self._tap_indices]

    @property
    def strides(self) -> list[int]:
        return [VGG16_TAP_STRIDES[t] for t in self.taps]

    def load_converted(self, state: dict[str, Tensor], prefix: str = "vgg.") -> "VGG16Features":
        """Copy conv weights from a converted LPIPS state dict (keys ``vgg.convs.{i}.{weight,bias}``)."""
        own = {k: v for k, v in state.items() if k.startswith(prefix + "convs.")}
        own = {k[len(prefix):]: v for k, v in own.items() if int(k.split(".")[2]) < len(self.convs)}
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing:
            raise AssetError(f"VGG16 weights lack {missing[:4]}")
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        images = to_rgb(images, "VGG16")
        x = (images - self.shift.to(images.dtype)) / self.scale.to(images.dtype)
        outputs: dict[int, Tensor] = {}
        last = max(self._tap_indices)
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            outputs[index] = x
            if index == last:
                break
            if index in _POOL_AFTER:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return [outputs[i] for i in self._tap_indices]


def load_vgg16_features(
    taps: Sequence[str] = LPIPS_TAPS, weights: Optional[PathLike] = None, pretrained: bool = True
) -> VGG16Features:
    """A frozen, eval-mode :class:`VGG16Features` with the packaged ImageNet weights.

    ``weights``: optional path accepted by :func:`maetok.assets.ensure_lpips_weights`.
    ``pretrained=False`` keeps a random initialisation (tests only).
    """
    model = VGG16Features(taps)
    if pretrained:
        model.load_converted(load_lpips_state_dict(weights))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
