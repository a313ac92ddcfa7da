"""A trained tokenizer over a dataset: the one place where images become latents or reconstructions.

* :func:`load_tokenizer`: a tokenizer from its model directory or its run directory, on a device;
* :func:`encode_images` / :func:`reconstruct_images`: a tensor of images, in batches;
* :func:`encode_dataset` / :func:`reconstructions`: every image of a dataset (flattened latents + labels for the
  latent analyses; (original, reconstruction) batches for the reconstruction metrics);
* :func:`cache_latents`: a dataset into a latent cache for diffusion training (the encoding loop; the cache's files
  are :mod:`maetok.data.latents`); :func:`latent_statistics`: the scalar latent mean / std of a seeded sample of a
  dataset, as the cache measures them (what a tokenizer folder carries);
* :func:`reconstruct_files`: ``maetok reconstruct``, image files to side-by-side (or reconstruction-only) PNGs, one
  per input (:func:`reconstruction_paths`).

Unreadable image files never become rows: they are left out and reported (``skipped`` lists, ``skipped.json``).

Latents are the deterministic ``encode`` (the posterior mean of a VAE) unless a cache asks for posterior samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from maetok.data import (
    IMAGE_EXTENSIONS,
    DatasetSubset,
    SkippedItem,
    iter_batches,
    list_image_files,
    note_channel_conversion,
)
from maetok.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    displayed_size,
    load_image,
    pixel_limit,
    resize_center_crop,
    save_image_grid,
    save_side_by_side,
    to_tensor,
)
from maetok.data.latents import LatentCacheWriter, LatentMoments
from maetok.errors import ConfigError, MissingFileError
from maetok.global_batch import SampleRandom
from maetok.models.tokenizer import MAETok
from maetok.runs import check_finite_tensors, display_path, resolve_device, weights_fingerprint

__all__ = ["cache_latents", "encode_dataset", "encode_images", "latent_statistics", "list_images", "load_tokenizer",
           "reconstruct_files", "reconstruct_images", "reconstruction_paths", "reconstructions"]

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
        for batch in iter_batches(dataset, batch_size, skipped=skipped, limit=limit):
            yield batch.images, reconstruct_images(model, batch.images, batch_size)
            bar.update(len(batch.images))


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
        for batch in iter_batches(dataset, batch_size):
            latents.append(encode_images(model, batch.images, batch_size).flatten(1))
            labels.append(batch.labels)
            bar.update(len(batch.images))
    return torch.cat(latents), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------------
# Latent caches (their files: maetok.data.latents)
# ---------------------------------------------------------------------------------------------------------


def posterior_draws(seed: int, indices: Tensor) -> SampleRandom:
    """The draws of a VAE's posterior samples for the dataset items ``indices`` ``(B,)`` in the latent cache:
    keyed by ``(seed, dataset index)`` (namespace ``latent_cache``; ``.child("flipped")`` for the flipped
    images)."""
    return SampleRandom(seed, 0, indices).child("latent_cache")


@torch.no_grad()
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
    """Encode ``dataset`` into the latent cache ``out_dir`` (resumable; its files:
    :class:`~maetok.data.latents.LatentCacheWriter`); returns the path of ``stats.json``.

    ``flip`` also stores the latents of the horizontally flipped images (``latents_flip``), which the
    diffusion trainer draws from at random. Statistics are over the unflipped latents. A cache in ``out_dir``
    made with other settings or by a tokenizer with other weights is refused (ValueError), or with
    ``restart_if_stale`` deleted and made again. ``sample_posterior``: store a sample of a VAE's posterior
    (default for a VAE) rather than its mean; only a VAE has a posterior to sample. Each image's noise is keyed
    by ``(seed, its dataset index)`` (:func:`posterior_draws`), so it depends on neither batch nor shard size.

    An unreadable image file leaves no row: each shard stores the dataset index of each row and its skipped
    items, and ``skipped.json`` lists them all; ``stats.json`` counts rows (``num_items``), listed items and
    skipped files.
    """
    from tqdm.auto import tqdm

    cfg = tokenizer.config
    is_vae = cfg.variant == "vae"
    if sample_posterior is None:
        sample_posterior = is_vae
    if sample_posterior and not is_vae:
        raise ConfigError(f"sample_posterior: only a VAE has a posterior to sample; this tokenizer is a "
                          f"{cfg.variant!r} (its latents are deterministic)")
    base = dataset.dataset if isinstance(dataset, DatasetSubset) else dataset
    writer = LatentCacheWriter(
        out_dir, num_items=len(dataset), shard_size=shard_size, latent_shape=(cfg.num_latent_tokens, cfg.latent_dim),
        flip=flip, dtype=dtype, tokenizer=tokenizer_dir, weights_sha256=weights_fingerprint(tokenizer),
        sample_posterior=sample_posterior, seed=seed, restart_if_stale=restart_if_stale,
        # which files count as unreadable depends on it
        dataset_settings={"max_image_pixels": base.max_image_pixels} if hasattr(base, "max_image_pixels") else None,
    )
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    with writer.hold:  # the folder is let go however this ends
        bar = tqdm(total=len(dataset), desc="cache latents", unit="img", disable=not progress)
        for shard in range(writer.num_shards):
            items = writer.shard_items(shard)
            if writer.resume_shard(shard):
                bar.update(len(items))
                continue
            latents, flipped, labels, rows, skipped = [], [], [], [], []
            for batch in iter_batches(DatasetSubset(dataset, items), batch_size, num_workers, skipped=skipped):
                bar.update(len(batch.indices))
                images = batch.images.to(device, non_blocking=True)
                batch_items = batch.indices + items.start  # dataset indices
                draws = posterior_draws(seed, batch_items)  # keyed by dataset index
                latents.append(tokenizer.encode(images, sample_posterior, draws).float().cpu())
                if flip:
                    flipped_draws = draws.child("flipped")
                    flipped.append(tokenizer.encode(images.flip(-1), sample_posterior, flipped_draws).float().cpu())
                check_finite_tensors({"latents": latents[-1], **({"flipped latents": flipped[-1]} if flip else {})},
                                     f"the tokenizer's output for dataset items {int(batch_items.min())}.."
                                     f"{int(batch_items.max())} (nothing of shard {shard} is written)")
                labels.append(batch.labels)
                rows.append(batch.indices)
            bar.update(len(skipped))
            writer.write_shard(shard, latents, flipped, labels, rows, skipped)
        bar.close()
        return writer.finish(cfg.image_size, cfg.in_channels, int(getattr(dataset, "num_classes", 0) or 0),
                             list(getattr(dataset, "class_names", []) or []))


# ---------------------------------------------------------------------------------------------------------
# maetok reconstruct
# ---------------------------------------------------------------------------------------------------------


#: how many images of the training set :func:`latent_statistics` encodes when a tokenizer trainer writes its model
LATENT_STATISTICS_IMAGES = 1024


@torch.no_grad()
def latent_statistics(tokenizer: MAETok, dataset: Dataset, num_images: int = LATENT_STATISTICS_IMAGES, seed: int = 0,
                      batch_size: int = 256) -> tuple[float, float]:
    """``(mean, std)``: the scalar mean and std over every latent element ``(N, L, H)`` of ``num_images`` images of
    ``dataset`` drawn at random with ``seed`` (all of them when it has no more), encoded as ``cache_latents`` with the
    same ``seed`` encodes them (a VAE's posterior samples, each image's noise keyed by its dataset index) and reduced as
    the cache's ``stats.json`` (:class:`~maetok.data.latents.LatentMoments`). Unreadable files are left out."""
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
    subset = DatasetSubset(dataset, chosen.tolist())
    sample = tokenizer.config.variant == "vae"
    moments = LatentMoments(tokenizer.config.latent_dim)
    for batch in iter_batches(subset, batch_size):
        draws = posterior_draws(seed, chosen[batch.indices])
        moments.update(tokenizer.encode(batch.images.to(_device_of(tokenizer)), sample, draws).float().cpu())
    stats = moments.stats()
    return stats["mean"], stats["std"]


def list_images(source: Union[str, Path]) -> list[Path]:
    """``maetok reconstruct --input``: an image file, or every image file below a folder."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise MissingFileError(f"--input {source} is neither an image file nor a folder")
    files = list_image_files(source)
    if not files:
        raise MissingFileError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
    return files


def reconstruction_paths(out_dir: Union[str, Path], source: Union[str, Path],
                         images: list[Path]) -> list[Path]:
    """Where ``maetok reconstruct`` writes the output of each of ``images`` (the files under the ``source`` folder,
    or ``source`` itself): its path relative to ``source`` (its name alone for a single file) under ``out_dir``, the
    extension replaced by ``.png``: ``in/a.jpg`` -> ``out/a.png``, ``in/sub/b.png`` -> ``out/sub/b.png``. Inputs
    that would share an output (``a.jpg`` and ``a.png`` in one folder) keep their full name instead: ``a.jpg.png``,
    ``a.png.png``; so distinct inputs never share an output."""
    from collections import Counter

    source = Path(source)
    relatives = [Path(image).relative_to(source) if source.is_dir() else Path(Path(image).name) for image in images]
    full_names = [relative.parent / (relative.name + ".png") for relative in relatives]
    chosen = [relative.with_suffix(".png") for relative in relatives]
    while True:  # each pass gives >= 1 clashing input its (unique) full name, so it ends
        counts = Counter(chosen)
        clashing = [i for i, path in enumerate(chosen) if counts[path] > 1 and path != full_names[i]]
        if not clashing:
            return [Path(out_dir) / path for path in chosen]
        for i in clashing:
            chosen[i] = full_names[i]


@torch.no_grad()
def reconstruct_files(
    model_path: Union[str, Path],
    source: Union[str, Path],
    out_dir: Union[str, Path],
    device: Optional[str] = None,
    batch_size: int = 32,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    skipped: Optional[list[SkippedItem]] = None,
    recon_only: bool = False,
) -> list[Path]:
    """Reconstruct every image under ``source`` (a file or a folder, walked by
    :func:`~maetok.data.list_image_files`); returns the paths written.

    Each input gets its own PNG (:func:`reconstruction_paths`: ``a.jpg`` -> ``a.png``, subfolders mirrored; ``a.jpg``
    beside ``a.png`` -> ``a.jpg.png`` and ``a.png.png``), holding original | reconstruction side by side, or the
    reconstruction alone with ``recon_only``; an output that would replace an input is refused. Inputs of another size
    than the model's are resized (shorter side) and center-cropped to it, said in one line with their sizes.
    Unreadable files (and files above ``max_image_pixels`` pixels; 0 or None: no limit) are skipped, reported in one
    line with their count, and appended to ``skipped`` when a list is given."""
    from collections import Counter

    from tqdm.auto import tqdm

    max_image_pixels = pixel_limit(max_image_pixels)
    model = load_tokenizer(model_path, device)
    cfg = model.config
    out_dir = Path(out_dir)
    files = list_images(source)
    if Path(source).is_dir():
        note_channel_conversion(str(source), cfg.in_channels)
    targets = reconstruction_paths(out_dir, source, files)
    inputs = {path.resolve() for path in files}
    for path, target in zip(files, targets):
        if target.resolve() in inputs:
            raise ConfigError(f"--out {out_dir}: {target} would replace the input image {path}; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped = skipped if skipped is not None else []
    resized: Counter[tuple[int, int]] = Counter()  # (width, height) of the inputs brought to the model's size
    for start in tqdm(range(0, len(files), batch_size), desc="reconstruct", unit="batch"):
        batch_paths, batch_targets, tensors = [], [], []
        for index, path in enumerate(files[start : start + batch_size], start):
            try:
                array = load_image(path, channels=cfg.in_channels, max_pixels=max_image_pixels,
                                   draft_size=cfg.image_size)
            except BadImageError as err:
                skipped.append(SkippedItem(index, str(path), err.reason))
                continue
            size = displayed_size(path)  # the file's own size (a large JPEG decodes reduced: draft_size)
            if size != (cfg.image_size, cfg.image_size):
                resized[size] += 1
            tensors.append(to_tensor(resize_center_crop(array, cfg.image_size)))
            batch_paths.append(path)
            batch_targets.append(targets[index])
        if not tensors:
            continue
        images = torch.stack(tensors)
        recon = reconstruct_images(model, images, batch_size)
        check_finite_tensors({"reconstructions": recon}, f"the tokenizer's output for {display_path(batch_paths[0])}"
                             f"{f' and {len(batch_paths) - 1} more inputs' if len(batch_paths) > 1 else ''}")
        for target, original, reconstruction in zip(batch_targets, images, recon):
            if recon_only:
                save_image_grid(reconstruction[None], target, nrow=1, pad=0)
            else:
                save_side_by_side(original[None], reconstruction[None], target, pairs_per_row=1)
            written.append(target)
    if resized:
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in resized.most_common(5)) + (", ..." if len(resized) > 5 else "")
        print(f"[maetok] {sum(resized.values())} of {len(written)} inputs were resized (shorter side) and center-cropped "
              f"to the model's {cfg.image_size}x{cfg.image_size}: {sizes}")
    if skipped:
        print(f"[maetok] skipped {len(skipped)} unreadable image(s): "
              + "; ".join(f"{display_path(item.file)}: {item.reason}" for item in skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    return written
