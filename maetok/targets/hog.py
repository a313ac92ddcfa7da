"""Low-level auxiliary targets: HOG (MaskFeat-style) and raw pixels, one feature vector per tokenizer patch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from maetok.models.blocks import patchify
from maetok.targets.base import FeatureTarget, register_target


class HOGTarget(FeatureTarget):
    """Histograms of oriented gradients per patch (Dalal & Triggs; MaskFeat's target).

    Per colour channel: central-difference gradients, unsigned orientation in ``[0, pi)`` hard-binned into
    ``num_bins`` bins, magnitudes summed over ``cell_size x cell_size`` cells, each cell's histogram
    L2-normalised. A patch's feature is the concatenation of its cells' histograms, laid out
    ``(cell_row, cell_col, channel, bin)``: ``(patch / cell)^2 * channels * num_bins`` values
    (108 for 16-pixel patches, 8-pixel cells, RGB). Works at any image size divisible by the patch size.
    """

    name = "hog"
    loss = "mse"

    def __init__(self, patch_size: int, in_channels: int, num_bins: int = 9, cell_size: int = 8):
        super().__init__()
        cell_size = min(cell_size, patch_size)
        if patch_size % cell_size:
            raise ValueError(f"HOG cell size {cell_size} must divide the patch size {patch_size}")
        self.patch_size = patch_size
        self.cell_size = cell_size
        self.num_bins = num_bins
        self.in_channels = in_channels
        self.cells_per_patch = patch_size // cell_size
        self.dim = self.cells_per_patch**2 * in_channels * num_bins
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, 3).repeat(in_channels, 1, 1, 1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, 3, 1).repeat(in_channels, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def cell_histograms(self, images: Tensor) -> Tensor:
        """images ``(B, C, H, W)`` -> L2-normalised histograms ``(B, C, num_bins, H / cell, W / cell)``."""
        x = images.float()
        c = x.shape[1]
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), self.kernel_x, groups=c)
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), self.kernel_y, groups=c)
        magnitude = torch.sqrt(gx**2 + gy**2)
        orientation = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned, [0, pi)
        bins = torch.floor(orientation / math.pi * self.num_bins).long().clamp_(0, self.num_bins - 1)
        votes = torch.zeros(x.shape[0], c, self.num_bins, *x.shape[2:], device=x.device)
        votes.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        hist = F.avg_pool2d(votes.flatten(1, 2), self.cell_size) * self.cell_size**2  # sums per cell
        hist = hist.unflatten(1, (c, self.num_bins))
        return F.normalize(hist, p=2, dim=2)

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"HOG target built for {self.in_channels} channels, got images {tuple(images.shape)}")
        hist = self.cell_histograms(images)  # (B, C, bins, H/cell, W/cell)
        b, c, k, hc, wc = hist.shape
        cp = self.cells_per_patch
        gh, gw = grid_size
        if (hc, wc) != (gh * cp, gw * cp):
            raise ValueError(f"image {tuple(images.shape[-2:])} does not match the token grid {grid_size}")
        hist = hist.reshape(b, c, k, gh, cp, gw, cp).permute(0, 3, 5, 4, 6, 1, 2)
        return hist.reshape(b, gh * gw, self.dim)


class PixelTarget(FeatureTarget):
    """Raw pixels of each patch (MAE's target), optionally normalised per patch (``norm_pix_loss``)."""

    name = "pixel"
    loss = "mse"

    def __init__(self, patch_size: int, in_channels: int, normalize: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.normalize = normalize
        self.dim = patch_size * patch_size * in_channels

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        patches = patchify(images.float(), self.patch_size)
        if self.normalize:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            patches = (patches - mean) / (var + 1e-6).sqrt()
        return patches


@register_target("hog")
def _build_hog(image_size: int, patch_size: int, in_channels: int, **options) -> FeatureTarget:
    return HOGTarget(patch_size, in_channels, **options)


@register_target("pixel")
def _build_pixel(image_size: int, patch_size: int, in_channels: int, **options) -> FeatureTarget:
    return PixelTarget(patch_size, in_channels, **options)
