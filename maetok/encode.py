"""A trained tokenizer over a dataset: the one place where images become latents or reconstructions.

* :func:`load_tokenizer`: a tokenizer from its model directory or its run directory, on a device;
* :func:`encode_images` / :func:`reconstruct_images`: a tensor of images, in batches;
* :func:`encode_dataset` / :func:`reconstructions`: every image of a dataset (flattened latents + labels for the
  latent analyses; (original, reconstruction) batches for the reconstruction metrics);
* :func:`cache_latents`: a dataset into a latent cache for diffusion training (read by :mod:`maetok.data.latents`);
* :func:`reconstruct_files`: ``maetok reconstruct``, image files to side-by-side PNGs (one per input,
  :func:`reconstruction_path`).

Unreadable image files never become rows: they are left out and reported (``skipped`` lists, ``skipped.json``).

Latents are the deterministic ``encode`` (the posterior mean of a VAE) unless a cache asks for posterior samples.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from maetok.data import (
    IMAGE_EXTENSIONS,
    DatasetSubset,
    SkippedItem,
    iter_batches,
    iter_item_batches,
    list_image_files,
    log_skipped_items,
)
from maetok.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    load_image,
    pixel_limit,
    resize_center_crop,
    save_side_by_side,
    to_tensor,
)
from maetok.data.latents import (
    PLAN_NAME,
    SKIPPED_METADATA_KEY,
    SKIPPED_NAME,
    STATS_NAME,
    read_shard_skips,
    shard_path,
)
from maetok.global_batch import SampleRandom
from maetok.models.tokenizer import MAETok
from maetok.runs import FORMAT_KEY, FORMAT_VERSION, resolve_device, weights_fingerprint, write_json

__all__ = ["cache_latents", "encode_dataset", "encode_images", "list_images", "load_tokenizer", "reconstruct_files",
           "reconstruct_images", "reconstruction_path", "reconstructions"]

PathLike = Union[str, Path]


def load_tokenizer(path: PathLike, device: Optional[Union[str, torch.device]] = None) -> MAETok:
    """The tokenizer of a model directory, a run directory holding ``model/``, a folder in the authors' released
    format or a Hugging Face hub id (:meth:`MAETok.from_pretrained`, the one loader), in eval mode on ``device``.
    A released tokenizer carries its scalar latent normalisation as ``latent_mean`` / ``latent_std``."""
    return MAETok.from_pretrained(path).to(resolve_device(device)).eval()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Latents ``(M, L, H)`` float32 on the CPU of images ``(M, C, S, S)`` in [-1, 1] (posterior means for a VAE),
    encoded on the model's device in batches of ``batch_size``."""
    device = _device_of(model)
    return torch.cat([model.encode(images[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruct_images(model: torch.nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Reconstructions ``(M, C, S, S)`` in [-1, 1] on the CPU of images ``(M, C, S, S)``, on the model's device."""
    device = _device_of(model)
    return torch.cat([model.decode(model.encode(images[i : i + batch_size].to(device))).clamp(-1, 1).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstructions(model: torch.nn.Module, dataset: Dataset, batch_size: int = 250,
                    progress: bool = True, skipped: Optional[list[SkippedItem]] = None,
                    limit: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, reconstructions)`` batches ``(B, C, S, S)`` in [-1, 1] on the CPU over every readable image of
    ``dataset`` (the first ``limit`` readable ones when given); unreadable files are left out and appended to
    ``skipped`` (logged when it is None)."""
    from tqdm.auto import tqdm

    model.eval()
    total = len(dataset) if limit is None else min(limit, len(dataset))
    with tqdm(total=total, desc="reconstruct", unit="img", disable=not progress) as bar:
        for images, _ in iter_batches(dataset, batch_size, skipped=skipped, limit=limit):
            yield images, reconstruct_images(model, images, batch_size)
            bar.update(images.shape[0])


@torch.no_grad()
def encode_dataset(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, progress: bool = True,
                   desc: str = "encode") -> tuple[Tensor, Tensor]:
    """Every readable image of ``dataset`` (wrap it in :class:`~maetok.data.DatasetSubset` for part of a split)
    through the encoder: flattened latents ``(N, L*H)`` float32 on the CPU and labels ``(N,)`` int64 (unreadable
    files are left out and logged)."""
    from tqdm.auto import tqdm

    model.eval()
    latents, labels = [], []
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for images, batch_labels in iter_batches(dataset, batch_size):
            latents.append(encode_images(model, images, batch_size).flatten(1))
            labels.append(batch_labels)
            bar.update(images.shape[0])
    return torch.cat(latents), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------------
# Latent caches
# ---------------------------------------------------------------------------------------------------------


class LatentMoments:
    """Float64 running sums over all (item, token) positions, per channel."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, latents: Tensor) -> None:
        flat = latents.reshape(-1, latents.shape[-1]).double()
        self.count += flat.shape[0]
        self.sum += flat.sum(0)
        self.sum_sq += flat.pow(2).sum(0)

    def stats(self) -> dict:
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.pow(2)).clamp_min(0)
        scalar_mean = self.sum.sum() / (self.count * len(self.sum))
        scalar_var = self.sum_sq.sum() / (self.count * len(self.sum)) - scalar_mean.pow(2)
        return {
            "mean": scalar_mean.item(),
            "std": scalar_var.clamp_min(0).sqrt().item(),
            "channel_mean": mean.tolist(),
            "channel_std": var.sqrt().tolist(),
        }


@torch.no_grad()
def posterior_draws(seed: int, indices: Tensor) -> SampleRandom:
    """The draws of a VAE's posterior samples for the dataset items ``indices`` ``(B,)`` in the latent cache:
    keyed by ``(seed, dataset index)`` (namespace ``latent_cache``; ``.child("flipped")`` for the flipped
    images)."""
    return SampleRandom(seed, 0, indices).child("latent_cache")


def cache_latents(
    tokenizer: torch.nn.Module,
    dataset: Dataset,
    out_dir: Union[str, Path],
    tokenizer_dir: Optional[Union[str, Path]] = None,
    flip: bool = False,
    batch_size: int = 256,
    shard_size: int = 16384,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    restart_if_stale: bool = False,
    sample_posterior: Optional[bool] = None,
    seed: int = 0,
) -> Path:
    """Encode ``dataset`` into ``out_dir`` (resumable); returns the path of ``stats.json``.

    ``flip`` also stores the latents of the horizontally flipped images (``latents_flip``), which the
    diffusion trainer draws from at random. Statistics are over the unflipped latents. A cache in ``out_dir``
    made with other settings or by a tokenizer with other weights is refused (ValueError), or with
    ``restart_if_stale`` deleted and made again. ``sample_posterior``: store a sample of a VAE's posterior
    (default for a VAE) rather than its mean; only a VAE has a posterior to sample. Each image's noise is keyed
    by ``(seed, its dataset index)`` (:func:`posterior_draws`), so it depends on neither batch nor shard size.

    An unreadable image file leaves no row: each shard stores the dataset index of each row ("indices") and its
    skipped items (metadata), and ``skipped.json`` lists them all (format in :mod:`maetok.data.latents`);
    ``stats.json`` counts rows (``num_items``), listed items and skipped files.
    """
    from tqdm.auto import tqdm

    is_vae = tokenizer.config.variant == "vae"
    if sample_posterior is None:
        sample_posterior = is_vae
    if sample_posterior and not is_vae:
        raise ValueError(f"sample_posterior: only a VAE has a posterior to sample; this tokenizer is a "
                         f"{tokenizer.config.variant!r} (its latents are deterministic)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = dataset.dataset if isinstance(dataset, DatasetSubset) else dataset
    plan = {
        FORMAT_KEY: FORMAT_VERSION,
        "num_items": len(dataset),
        "shard_size": shard_size,
        "flip": flip,
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
        "dtype": str(dtype),
        "tokenizer_weights_sha256": weights_fingerprint(tokenizer),
        "sample_posterior": sample_posterior,
        "seed": seed if sample_posterior else None,
    }
    if hasattr(base, "max_image_pixels"):  # which files count as unreadable depends on it
        plan["max_image_pixels"] = base.max_image_pixels
    plan_path = out_dir / PLAN_NAME
    if plan_path.exists() and not _same_plan(json.loads(plan_path.read_text()), plan):
        if not restart_if_stale:
            raise ValueError(
                f"{out_dir} holds a cache made with other settings or another tokenizer's weights "
                f"({plan_path.read_text().strip()}); use another --out or delete it"
            )
        shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    write_json(plan_path, plan, atomic=True)
    if (out_dir / STATS_NAME).exists():
        os.remove(out_dir / STATS_NAME)  # rewritten at the end; its absence marks an unfinished cache
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    num_items = len(dataset)
    num_shards = (num_items + shard_size - 1) // shard_size
    moments = LatentMoments(tokenizer.config.latent_dim)
    num_rows = 0
    skipped: list[tuple[int, str, str]] = []  # (dataset index, file, reason)
    legacy_shards: list[int] = []  # shards written before skip lists existed
    bar = tqdm(total=num_items, desc="cache latents", unit="img", disable=not progress)
    for shard in range(num_shards):
        path = shard_path(out_dir, shard)
        first, stop = shard * shard_size, min(num_items, (shard + 1) * shard_size)
        if path.exists():
            done = load_file(str(path))["latents"]
            if len(done):
                moments.update(done)
            num_rows += len(done)
            shard_skips = read_shard_skips(path)
            if shard_skips is None:
                legacy_shards.append(shard)
            else:
                skipped.extend(shard_skips)
            bar.update(stop - first)
            continue
        latents, flipped, labels, indices, shard_skips = [], [], [], [], []
        for batch in iter_item_batches(DatasetSubset(dataset, range(first, stop)), batch_size, num_workers):
            shard_skips.extend((first + item.index, item.file, item.reason) for item in batch.skipped)
            bar.update(len(batch.indices) + len(batch.skipped))
            if not len(batch.indices):
                continue
            images = batch.images.to(device, non_blocking=True)
            draws = posterior_draws(seed, batch.indices + first)
            latents.append(tokenizer.encode(images, sample_posterior, draws).float().cpu())
            if flip:
                flipped_draws = draws.child("flipped")
                flipped.append(tokenizer.encode(images.flip(-1), sample_posterior, flipped_draws).float().cpu())
            labels.append(batch.labels)
            indices.append(batch.indices + first)
        latent_shape = (tokenizer.config.num_latent_tokens, tokenizer.config.latent_dim)
        tensors = {
            "latents": torch.cat(latents).to(dtype) if latents else torch.empty(0, *latent_shape, dtype=dtype),
            "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
            "indices": torch.cat(indices) if indices else torch.empty(0, dtype=torch.int64),
        }
        if flip:
            tensors["latents_flip"] = torch.cat(flipped).to(dtype) if flipped else tensors["latents"].clone()
        if latents:
            moments.update(tensors["latents"])
        num_rows += len(tensors["latents"])
        skipped.extend(shard_skips)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={SKIPPED_METADATA_KEY: json.dumps([list(s) for s in shard_skips])})
        os.replace(tmp, path)
    bar.close()
    if num_rows == 0:
        raise ValueError(f"none of the {num_items} images of the dataset could be read: no latents to cache in {out_dir}")
    skipped_items = [SkippedItem(index, file, reason) for index, file, reason in skipped]
    log_skipped_items(skipped_items, f"the latent cache {out_dir}")
    if legacy_shards:
        print(f"[maetok] {out_dir}: shard(s) {legacy_shards} were written by an older maetok that replaced unreadable "
              "files by a neighbour; those are not listed in skipped.json")
    write_json(out_dir / SKIPPED_NAME, {
        FORMAT_KEY: FORMAT_VERSION,
        "num_skipped": len(skipped_items),
        "skipped": [item.to_dict() for item in skipped_items],
        "shards_without_skip_list": legacy_shards,
    }, atomic=True)
    cfg = tokenizer.config
    stats = {
        FORMAT_KEY: FORMAT_VERSION,
        "num_items": num_rows,
        "num_listed_items": num_items,
        "num_skipped_images": len(skipped_items),
        "skipped_list": SKIPPED_NAME,
        "num_shards": num_shards,
        "latent_shape": [cfg.num_latent_tokens, cfg.latent_dim],
        "flip": flip,
        "sample_posterior": sample_posterior,
        "tokenizer": plan["tokenizer"],
        "image_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
        "class_names": list(getattr(dataset, "class_names", []) or []),
        **moments.stats(),
    }
    return write_json(out_dir / STATS_NAME, stats, atomic=True)


# plan keys added after caches were first written: a stored plan without one was written before it existed
_PLAN_KEYS_ADDED_LATER = ("max_image_pixels",)


def _same_plan(stored: dict, plan: dict) -> bool:
    """Whether a cache's stored plan asks for what ``plan`` asks (its format version aside: a version-0 cache is
    completed as it is; keys it predates are not compared)."""
    ignored = {FORMAT_KEY} | {key for key in _PLAN_KEYS_ADDED_LATER if key not in stored}
    return {k: v for k, v in stored.items() if k not in ignored} == {k: v for k, v in plan.items() if k not in ignored}


# ---------------------------------------------------------------------------------------------------------
# maetok reconstruct
# ---------------------------------------------------------------------------------------------------------


def list_images(source: Union[str, Path]) -> list[Path]:
    """``maetok reconstruct --input``: an image file, or every image file below a folder."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source} is neither an image file nor a folder")
    files = list_image_files(source)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
    return files


RECONSTRUCTION_SUFFIX = ".png"


def reconstruction_path(out_dir: Union[str, Path], source: Union[str, Path], image: Union[str, Path]) -> Path:
    """Where ``maetok reconstruct`` writes the side-by-side PNG of ``image``: its path relative to the ``source``
    folder (its name alone for a single file), full file name and extension kept, plus ``.png``, under
    ``out_dir``: ``in/a.jpg`` -> ``out/a.jpg.png``, ``in/a.png`` -> ``out/a.png.png``, ``in/sub/a.png`` ->
    ``out/sub/a.png.png``. Distinct inputs therefore never share an output."""
    source, image = Path(source), Path(image)
    relative = image.relative_to(source) if source.is_dir() else Path(image.name)
    return Path(out_dir) / relative.parent / (relative.name + RECONSTRUCTION_SUFFIX)


@torch.no_grad()
def reconstruct_files(
    model_path: Union[str, Path],
    source: Union[str, Path],
    out_dir: Union[str, Path],
    device: Optional[str] = None,
    batch_size: int = 32,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    skipped: Optional[list[SkippedItem]] = None,
) -> list[Path]:
    """Reconstruct every image under ``source`` (a file or a folder, walked by
    :func:`~maetok.data.list_image_files`); returns the paths written.

    Each input gets its own output, ``out_dir/<path relative to source>.png`` (subfolders mirrored, the input's
    full name and extension kept: ``a.jpg`` -> ``a.jpg.png``, ``sub/a.png`` -> ``sub/a.png.png``; see
    :func:`reconstruction_path`), holding original | reconstruction side by side. Unreadable files (and files
    above ``max_image_pixels`` pixels; 0 or None: no limit) are skipped, reported in one line with their count, and appended to
    ``skipped`` when a list is given."""
    from tqdm.auto import tqdm

    max_image_pixels = pixel_limit(max_image_pixels)
    model = load_tokenizer(model_path, device)
    cfg = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    written: list[Path] = []
    skipped = skipped if skipped is not None else []
    for start in tqdm(range(0, len(files), batch_size), desc="reconstruct", unit="batch"):
        batch_files, tensors = [], []
        for index, path in enumerate(files[start : start + batch_size], start):
            try:
                array = load_image(path, channels=cfg.in_channels, max_pixels=max_image_pixels,
                                   draft_size=cfg.image_size)
            except BadImageError as err:
                skipped.append(SkippedItem(index, str(path), err.reason))
                continue
            tensors.append(to_tensor(resize_center_crop(array, cfg.image_size)))
            batch_files.append(path)
        if not tensors:
            continue
        images = torch.stack(tensors)
        recon = reconstruct_images(model, images, batch_size)
        for path, original, reconstruction in zip(batch_files, images, recon):
            target = reconstruction_path(out_dir, source, path)
            save_side_by_side(original[None], reconstruction[None], target, pairs_per_row=1)
            written.append(target)
    if skipped:
        print(f"[maetok] skipped {len(skipped)} unreadable image(s): "
              + "; ".join(f"{item.file}: {item.reason}" for item in skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    return written
