"""Low-level auxiliary targets: HOG (MaskFeat-style) and raw pixels, one feature vector per tokenizer patch."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from maetok.models.blocks import patchify
from maetok.targets.base import FeatureTarget, register_target


def gaussian_window(size: int, std: float) -> Tensor:
    """2D Gaussian window ``(size, size)``: outer product of ``exp(-0.5 ((i - (size - 1) / 2) / std)^2)``
    (peak ~1, not normalised to sum 1), as MaskFeat's HOG weighting."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (offsets / std) ** 2)
    return torch.outer(w, w).float()


def sobel_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel Sobel responses ``(gx, gy)``, each ``(B, C, H, W)``, with reflect padding of 1.

    The cross-correlation with ``[[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` (x) and its transpose (y), i.e. a
    depthwise 3x3 conv, evaluated separably with elementwise ops so that equal rows (columns) give exactly
    zero ``gy`` (``gx``). A conv's rounding can leave ~1e-7 there, which flips the orientation of such
    axis-aligned edges between the first and the last bin (the bin edge at angle 0).
    """
    p = F.pad(images, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
    diff_x = p[..., :, :-2] - p[..., :, 2:]  # (B, C, H + 2, W): [1, 0, -1] along x
    gx = diff_x[..., :-2, :] + 2 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]  # [1, 2, 1] along y
    smooth_x = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]  # [1, 2, 1] along x
    gy = smooth_x[..., :-2, :] - smooth_x[..., 2:, :]  # [1, 0, -1] along y
    return gx, gy


class HOGTarget(FeatureTarget):
    """Histograms of oriented gradients per patch, following MaskFeat's HOG target (Dalal & Triggs).

    Per colour channel (depthwise, any channel count):

    1. gradients by the 3x3 Sobel kernels ``[[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` (x) and its transpose
       (y), with reflect padding of 1 pixel, so the output keeps the image size (:func:`sobel_gradients`);
    2. magnitudes ``sqrt(gx^2 + gy^2)`` weighted by a Gaussian window ``w[i] w[j]`` with
       ``w[i] = exp(-0.5 ((i - (window_size - 1) / 2) / (window_size / 2))^2)`` (peak ~1), tiled over the
       image: pixel ``(r, c)`` gets the weight at ``(r mod window_size, c mod window_size)``, i.e. the window
       is repeated and cropped to ``H x W`` (sizes that are not multiples of the window get a partial last
       tile); ``window_size=None`` disables the weighting;
    3. unsigned orientation ``atan2(gy, gx)`` hard-binned into ``num_bins`` bins over ``[0, pi)``:
       ``floor(atan2(gy, gx) / pi * num_bins) mod num_bins`` (bin 0 = horizontal gradient, i.e. vertical edges);
    4. weighted magnitudes summed per ``cell_size x cell_size`` cell and bin, each cell's histogram
       L2-normalised over its bins (all zeros for flat cells).

    A patch's feature concatenates its cells' histograms laid out ``(cell_row, cell_col, channel, bin)``:
    ``(patch / cell)^2 * channels * num_bins`` values (108 for 16-pixel patches, 8-pixel cells, RGB).
    ``cell_size`` is capped at ``patch_size``. Works at any image size divisible by the patch size (and at
    least 2 pixels, for the reflect padding).

    Two deliberate differences from MaskFeat's reference code, neither changing the method: it calls
    ``atan2(gx, gy)`` (angles from the y axis, bin edges offset by half a bin); we use the usual
    ``atan2(gy, gx)``. It normalises the window to sum 1; we keep peak ~1 -- a constant factor that the
    per-cell L2 normalisation removes.
    """

    name = "hog"
    loss = "mse"

    def __init__(self, patch_size: int, in_channels: int, num_bins: int = 9, cell_size: int = 8,
                 window_size: Optional[int] = 16):
        super().__init__()
        cell_size = min(cell_size, patch_size)
        if patch_size % cell_size:
            raise ValueError(f"HOG cell size {cell_size} must divide the patch size {patch_size}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"HOG window size must be a positive int or None, got {window_size}")
        self.patch_size = patch_size
        self.cell_size = cell_size
        self.num_bins = num_bins
        self.in_channels = in_channels
        self.window_size = window_size
        self.cells_per_patch = patch_size // cell_size
        self.dim = self.cells_per_patch**2 * in_channels * num_bins
        window = gaussian_window(window_size, window_size / 2) if window_size is not None else None
        self.register_buffer("window", window, persistent=False)

    def tiled_window(self, height: int, width: int) -> Optional[Tensor]:
        """The Gaussian window repeated over an ``(height, width)`` image and cropped to it; None if disabled."""
        if self.window is None:
            return None
        ws = self.window.shape[0]
        reps = (-(-height // ws), -(-width // ws))  # ceil
        return self.window.repeat(*reps)[:height, :width]

    @torch.no_grad()
    def cell_histograms(self, images: Tensor) -> Tensor:
        """images ``(B, C, H, W)`` -> L2-normalised histograms ``(B, C, num_bins, H / cell, W / cell)``."""
        x = images.float()
        b, c, h, w = x.shape
        cs = self.cell_size
        if h % cs or w % cs:
            raise ValueError(f"image size {(h, w)} is not divisible by the HOG cell size {cs}")
        gx, gy = sobel_gradients(x)
        magnitude = torch.sqrt(gx**2 + gy**2)
        window = self.tiled_window(h, w)
        if window is not None:
            magnitude = magnitude * window
        # floor(atan2 / pi * bins) mod bins, computed as the bin of the unsigned angle in [0, pi): fmod maps
        # +-pi exactly to 0, where a rounded division (CUDA multiplies by 1/pi) could give bin 8 for +pi
        orientation = torch.remainder(torch.atan2(gy, gx), math.pi)
        bins = torch.floor(orientation * (self.num_bins / math.pi)).long().clamp_(0, self.num_bins - 1)
        votes = torch.zeros(b, c, self.num_bins, h, w, device=x.device)
        votes.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        hist = votes.view(b, c, self.num_bins, h // cs, cs, w // cs, cs).sum(dim=(4, 6))  # sums per cell
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
