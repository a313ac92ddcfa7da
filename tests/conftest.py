"""Shared test helpers: session fixtures, plus the small helpers several test modules use.

The helpers are plain names, imported with ``from conftest import ...`` (pytest puts this folder on sys.path).
They import ``maetok`` lazily, inside the helper, so an import error in one package module fails only the
tests that use that helper instead of every test in the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

if TYPE_CHECKING:
    from maetok.config import TokenizerTrainConfig
    from maetok.eval.inception import InceptionFeatures
    from maetok.losses.discriminator import ProjectedDiscriminator

torch.set_num_threads(1)  # tiny models run fastest on one thread; pytest -n 2 uses both cores


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Memoised Inception features go to a temporary folder, never into the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("inception-features")
        patch.setenv("MAETOK_FEATURE_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Two classes of small RGB images, plus a truncated JPEG and a text file posing as a PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir()
        for i in range(10):
            pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / "cats" / "broken.jpg")
    data = (root / "cats" / "broken.jpg").read_bytes()
    (root / "cats" / "broken.jpg").write_bytes(data[: len(data) // 3])
    (root / "dogs" / "notes.png").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------

# Skip marker for tests that read the Fashion-MNIST files installed under FASHION_MNIST_DIR.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


# ---------------------------------------------------------------------------------------------------------
# tokenizer training
# ---------------------------------------------------------------------------------------------------------

# Config overrides for a tiny 16x16 tokenizer (width 32, depth 1) with short logging/eval/checkpoint periods.
TINY = [
    "model.image_size=16",
    "model.in_channels=3",
    "model.patch_size=4",
    "model.encoder_width=32",
    "model.encoder_depth=1",
    "model.encoder_heads=2",
    "model.decoder_width=32",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "model.aux_width=32",
    "model.aux_heads=2",
    "model.aux_depth=1",
    "model.num_latent_tokens=4",
    "model.latent_dim=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=3",
    "train.ckpt_every=2",
    "optim.warmup_steps=2",
    "data.eval_images=4",
]


def tiny_cfg(folder, *extra) -> TokenizerTrainConfig:
    """The fashion-mnist-maetok training config shrunk by TINY, reading images from ``folder``, plus ``extra``."""
    from maetok.config import TokenizerTrainConfig, load_config

    return load_config(TokenizerTrainConfig, "fashion-mnist-maetok", TINY + [f"data.dataset={folder}", *extra])


# ---------------------------------------------------------------------------------------------------------
# latent diffusion
# ---------------------------------------------------------------------------------------------------------

# Config overrides of the fashion-mnist-sit preset for a tiny SiT (width 32, depth 2) on the tiny latents below.
TINY_SIT = [
    "model.width=32",
    "model.depth=2",
    "model.num_heads=2",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=4",
    "train.ckpt_every=2",
    "sampling.grid_steps=3",
    "sampling.steps=5",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A randomly initialised tiny AE tokenizer folder (16 px RGB, 4 x 4 latents)."""
    from maetok.config import TokenizerConfig
    from maetok.models.tokenizer import MAETok

    torch.manual_seed(0)
    cfg = TokenizerConfig(
        image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
        decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4, latent_dim=4, aux_targets=[],
        mask_ratio_min=0.0, mask_ratio_max=0.0, variant="ae",
    )
    path = tmp_path_factory.mktemp("tok") / "model"
    MAETok(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latent_dir(tokenizer_dir, image_folder, tmp_path_factory):
    """The latent cache of ``image_folder`` (with flips) made by ``tokenizer_dir``."""
    from maetok.data import build_dataset
    from maetok.encode import cache_latents
    from maetok.models.tokenizer import MAETok

    out = tmp_path_factory.mktemp("latents")
    dataset = build_dataset(str(image_folder), "all", 16, 3)
    cache_latents(MAETok.from_pretrained(tokenizer_dir), dataset, out, tokenizer_dir, flip=True, shard_size=7, progress=False)
    return out


# ---------------------------------------------------------------------------------------------------------
# adversarial loss
# ---------------------------------------------------------------------------------------------------------


def tiny_discriminator(seed: int = 0) -> ProjectedDiscriminator:
    """A small randomly initialised VGG16 projected discriminator (two taps, 8 channels), seeded by ``seed``."""
    from maetok.losses.discriminator import build_discriminator

    torch.manual_seed(seed)
    return build_discriminator("vgg16", pretrained=False, taps=("relu1_2", "relu2_2"), hidden_channels=8)


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------


class StubInception(torch.nn.Module):
    """The InceptionV3 call interface (0..255 images in, InceptionFeatures out) with tiny random-projection
    features, so the pipelines can be checked exactly against the metric functions in milliseconds."""

    def __init__(self, with_logits: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("pool_projection", torch.randn(48, 12, generator=g))
        self.register_buffer("class_projection", torch.randn(12, 10, generator=g))
        self.with_logits = with_logits

    @property
    def device(self) -> torch.device:
        return self.pool_projection.device

    def forward(self, images) -> InceptionFeatures:
        from maetok.eval.inception import InceptionFeatures, images_to_float255

        x = torch.nn.functional.adaptive_avg_pool2d(images_to_float255(images), 4).flatten(1) / 255.0  # (B, 48)
        pool3 = torch.relu(x @ self.pool_projection)
        logits = pool3 @ self.class_projection if self.with_logits else None
        return InceptionFeatures(pool3=pool3, spatial=x[:, :9], logits=logits)
