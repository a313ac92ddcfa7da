"""``maetok reconstruct``: encode + decode image files with a trained tokenizer, write side-by-side PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from maetok.data.images import BadImageError, load_image, resize_center_crop, save_side_by_side, to_tensor
from maetok.models.tokenizer import MAETok

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def model_directory(path: Union[str, Path]) -> Path:
    """A model directory itself, or the ``model/`` inside a run directory."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def load_tokenizer(path: Union[str, Path], device: Optional[str] = None) -> MAETok:
    """A tokenizer directory, or a run directory holding ``model/``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return MAETok.from_pretrained(model_directory(path)).to(dev).eval()


def list_images(source: Union[str, Path]) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source} is neither an image file nor a folder")
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
    return files


@torch.no_grad()
def reconstruct_paths(
    model_path: Union[str, Path],
    source: Union[str, Path],
    out_dir: Union[str, Path],
    device: Optional[str] = None,
    batch_size: int = 32,
) -> list[Path]:
    """Reconstruct every image under ``source``; unreadable files are reported and skipped.
    Writes ``out_dir/<stem>_recon.png`` (original | reconstruction) per image; returns the paths."""
    from tqdm.auto import tqdm

    model = load_tokenizer(model_path, device)
    cfg = model.config
    device_t = next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    written: list[Path] = []
    skipped: list[str] = []
    for start in tqdm(range(0, len(files), batch_size), desc="reconstruct", unit="batch"):
        batch_files, tensors = [], []
        for path in files[start : start + batch_size]:
            try:
                array = load_image(path, channels=cfg.in_channels)
            except BadImageError as err:
                skipped.append(f"{path}: {err}")
                continue
            tensors.append(to_tensor(resize_center_crop(array, cfg.image_size)))
            batch_files.append(path)
        if not tensors:
            continue
        images = torch.stack(tensors).to(device_t)
        recon = model.decode(model.encode(images)).clamp(-1, 1)
        for path, original, reconstruction in zip(batch_files, images, recon):
            target = out_dir / f"{path.stem}_recon.png"
            save_side_by_side(original[None], reconstruction[None], target, pairs_per_row=1)
            written.append(target)
    if skipped:
        print(f"[maetok] skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    return written
