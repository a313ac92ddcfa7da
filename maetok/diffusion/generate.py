"""``maetok sample``: latents from a diffusion model, decoded by the tokenizer, written as PNGs, a grid and an
ADM-format ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from maetok.config import SamplingConfig
from maetok.data.images import save_image_grid, to_rgb, to_uint8
from maetok.data.latents import LatentNormalizer
from maetok.data.npz import save_sample_batch
from maetok.diffusion.pipeline import LatentGenerator
from maetok.models.tokenizer import MAETok


@torch.no_grad()
def generate_images(
    pipe: LatentGenerator,
    tokenizer: MAETok,
    num: int,
    labels: Optional[torch.Tensor] = None,
    sampling: Optional[SamplingConfig] = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    normalizer: Optional[LatentNormalizer] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``num`` images as uint8 ``(num, H, W, C)`` and their labels ``(num,)`` (None if unconditional).
    ``labels`` default: all classes evenly (``i % num_classes``). ``normalizer``: the latent normalisation to
    undo (default the model's; see :meth:`LatentGenerator.normalizer_for`)."""
    from tqdm.auto import tqdm

    if labels is None:
        labels = pipe.balanced_labels(num)
    if labels is not None and len(labels) != num:
        raise ValueError(f"got {len(labels)} labels for {num} samples")
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in tqdm(range(0, num, batch_size), desc="sample", unit="batch", disable=not progress):
        count = min(batch_size, num - start)
        batch_labels = labels[start : start + count] if labels is not None else None
        latents = pipe.sample_latents(batch_labels, count, sampling, generator=generator, normalizer=normalizer)
        decoded = tokenizer.decode(latents.to(next(tokenizer.parameters()).device)).clamp(-1, 1)
        images.append(to_uint8(decoded.cpu(), channels_last=True).numpy())  # NaN / inf raise: never gray images
    return np.concatenate(images), (labels.numpy() if labels is not None else None)


def write_samples(
    out_dir: Union[str, Path], images: np.ndarray, labels: Optional[np.ndarray], png_limit: Optional[int] = None
) -> dict[str, Path]:
    """``out_dir/images/NNNNNN.png`` (the first ``png_limit``), ``out_dir/grid.png`` (up to 100) and
    ``out_dir/samples.npz`` (ADM format); returns the paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images[: png_limit if png_limit is not None else len(images)]):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out_dir / "images" / f"{i:06d}.png")
    save_image_grid(torch.from_numpy(images[:100]).permute(0, 3, 1, 2), out_dir / "grid.png", nrow=10)
    npz = out_dir / "samples.npz"
    save_sample_batch(npz, to_rgb(images), labels)  # the ADM suite reads RGB
    return {"images": out_dir / "images", "grid": out_dir / "grid.png", "npz": npz}
