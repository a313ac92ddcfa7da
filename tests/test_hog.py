"""The HOG target against an independent numpy implementation of MaskFeat's HOG (Sobel gradients with reflect
padding, tiled Gaussian window, unsigned 9-bin hard binning, per-cell sums, per-cell L2 normalisation), plus
known patterns and shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maetok.targets.base import build_target
from maetok.targets.hog import HOGTarget

SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def numpy_hog(images: np.ndarray, patch: int, cell: int = 8, bins: int = 9, window: int = 16) -> np.ndarray:
    """Reference: images (B, C, H, W) float64 -> (B, (H/patch) * (W/patch), (patch/cell)^2 * C * bins)."""
    b, c, h, w = images.shape
    cell = min(cell, patch)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    gx = np.zeros_like(images)
    gy = np.zeros_like(images)
    for a in range(3):  # cross-correlation: out[i, j] = sum_ab K[a, b] * padded[i + a, j + b]
        for d in range(3):
            shifted = padded[:, :, a:a + h, d:d + w]
            gx += SOBEL_X[a, d] * shifted
            gy += SOBEL_X.T[a, d] * shifted
    offsets = (np.arange(window) - (window - 1) / 2) / (window / 2)
    w1 = np.exp(-0.5 * offsets**2)
    weight = w1[np.arange(h) % window][:, None] * w1[np.arange(w) % window][None, :]  # tiled, cropped
    magnitude = np.sqrt(gx**2 + gy**2) * weight
    phase = np.arctan2(gy, gx)  # (-pi, pi]
    bin_index = np.mod(np.floor(phase / np.pi * bins), bins).astype(int)  # MaskFeat's formula
    hc, wc = h // cell, w // cell
    hist = np.zeros((b, c, bins, hc, wc))
    for bi in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    hist[bi, ch, bin_index[bi, ch, i, j], i // cell, j // cell] += magnitude[bi, ch, i, j]
    norm = np.sqrt((hist**2).sum(axis=2, keepdims=True))
    hist = hist / np.maximum(norm, 1e-12)
    cp = patch // cell
    gh, gw = h // patch, w // patch
    out = np.zeros((b, gh * gw, cp * cp * c * bins))
    for bi in range(b):
        for pr in range(gh):
            for pc in range(gw):
                values = []
                for cr in range(cp):  # layout (cell_row, cell_col, channel, bin)
                    for cc in range(cp):
                        for ch in range(c):
                            values.extend(hist[bi, ch, :, pr * cp + cr, pc * cp + cc])
                out[bi, pr * gw + pc] = values
    return out


def quantised_images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random images on a 1/128 grid in [-1, 1): Sobel sums are exact in float32, so torch and numpy see the
    same gradients and bin edges cannot be crossed by rounding."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(batch, channels, height, width)) / 128.0 - 1.0).float()


@pytest.mark.parametrize(
    "channels, height, width, patch",
    [(3, 32, 32, 16), (1, 32, 32, 16), (3, 48, 48, 16), (3, 40, 24, 8), (2, 16, 16, 4)],
)
def test_matches_numpy_reference(channels, height, width, patch):
    images = quantised_images(2, channels, height, width, seed=height + channels)
    hog = HOGTarget(patch_size=patch, in_channels=channels)
    grid = (height // patch, width // patch)
    out = hog(images, grid)
    expected = numpy_hog(images.double().numpy(), patch)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=0)


def test_window_tiles_and_crops():
    hog = HOGTarget(patch_size=8, in_channels=1, window_size=16)
    window = hog.tiled_window(40, 24)
    assert window.shape == (40, 24)
    torch.testing.assert_close(window[16:32, :16], hog.window)
    torch.testing.assert_close(window[32:, 16:], hog.window[:8, :8])
    assert abs(hog.window.max().item() - np.exp(-0.5 * (0.5 / 8) ** 2) ** 2) < 1e-6  # peak ~1 at the centre
    # window_size=None: no weighting, so a 28px image (not a multiple of 16) works with or without it
    flat = HOGTarget(patch_size=4, in_channels=1, window_size=None)
    images = quantised_images(1, 1, 28, 28, seed=3)
    assert flat(images, (7, 7)).shape == (1, 49, 9) and hog.tiled_window(28, 28).shape == (28, 28)


def test_step_edges_and_flat_images():
    hog = HOGTarget(patch_size=16, in_channels=3)
    step = torch.zeros(1, 3, 32, 32)
    step[..., 13:] = 1.0  # vertical edge, horizontal gradient (orientation 0) -> bin 0
    for vertical_edge in (step, 1.0 - step):  # both polarities: the orientation is unsigned
        hist = hog.cell_histograms(vertical_edge)  # (1, 3, 9, 4, 4)
        energy = hist.sum(dim=(0, 1, 3, 4))
        assert energy[0] > 0 and energy[1:].abs().max() == 0
    hist_h = hog.cell_histograms(step.transpose(-1, -2))  # horizontal edge: orientation pi/2 -> bin 4
    energy_h = hist_h.sum(dim=(0, 1, 3, 4))
    assert energy_h[4] > 0 and energy_h[torch.arange(9) != 4].abs().max() == 0
    torch.testing.assert_close(hist_h.max(), torch.tensor(1.0))  # L2-normalised cells with an edge
    flat = hog(torch.full((2, 3, 32, 32), 0.25), (2, 2))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_shapes_and_registry():
    hog = build_target("hog", 256, 16, 3)
    assert isinstance(hog, HOGTarget) and hog.dim == 108  # 2x2 cells x 3 channels x 9 bins
    out = hog(torch.rand(3, 3, 64, 32) * 2 - 1, (4, 2))
    assert out.shape == (3, 8, 108) and out.dtype == torch.float32
    gray = build_target("hog", 32, 16, 1, window_size=8)
    assert gray.dim == 36 and gray(torch.rand(2, 1, 32, 32), (2, 2)).shape == (2, 4, 36)
    with pytest.raises(ValueError, match="token grid"):
        hog(torch.rand(1, 3, 32, 32), (4, 4))
