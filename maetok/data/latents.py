"""Latent caches: a dataset encoded once by a tokenizer, for diffusion training. This module is the one that knows a
cache's files (layout, names, metadata, writing, completing, reading, statistics); the encoding loop that fills
one is :func:`maetok.encode.cache_latents`, through :class:`LatentCacheWriter` (this module knows no model).

A cache directory holds::

    cache_plan.json               the settings of the cache (flip, VAE posterior sampling and its seed, ...) and a
                                  hash of the tokenizer's weights (a rerun with other settings or another
                                  tokenizer is refused, or restarts on request)
    shard-00000.safetensors ...   "latents" (n, L, H) [+ "latents_flip" (n, L, H)], "labels" (n,) int64,
                                  "indices" (n,) int64: the dataset item of each row; the safetensors
                                  metadata key "skipped" holds the shard's unreadable items (JSON list of
                                  [index, file, reason])
    skipped.json                  every unreadable item left out of the cache (see below)
    stats.json                    row count, latent shape, scalar and per-channel mean/std, the tokenizer
                                  directory, class names, skip count; written last, so its presence means
                                  "complete"

The JSON files carry ``format_version`` (:data:`maetok.runs.FORMAT_VERSION`; caches written before it read as 0).

Shard ``i`` holds the readable items among dataset items ``[i * shard_size, (i + 1) * shard_size)``, in order:
an unreadable (bad) file leaves no row, so a shard may hold fewer than ``shard_size`` rows and ``stats.json``'s
``num_items`` counts rows (``num_listed_items`` counts the dataset's items, ``num_skipped_images`` the files left
out). ``skipped.json``::

    {"format_version": 1, "num_skipped": 2,
     "skipped": [{"index": 13, "file": "cats/broken.jpg", "reason": "corrupt or truncated (...)"}, ...],
     "shards_without_skip_list": []}

``index`` is the dataset item, ``file`` the path relative to the image folder. Shards written by a maetok
before this format (no "indices" tensor: their unreadable files were replaced by a neighbour) are named in
``shards_without_skip_list``. Each shard is written to a temporary file and renamed, so a crash leaves no
half-written shard and a rerun skips the finished ones (with their skip lists).

A VAE's latents are by default a sample of its posterior (DiT / SiT practice: the diffusion model learns the
distribution the decoder was trained on), each image's noise keyed by ``(seed, dataset index)`` so a resumed cache
equals an uninterrupted one; ``sample_posterior=False`` stores the posterior mean.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from maetok.data.datasets import SkippedItem, log_skipped_items
from maetok.errors import DataError, MissingFileError
from maetok.runs import FORMAT_KEY, FORMAT_VERSION, check_format_version, clear_held_folder, display_path, hold_folder, \
    read_json_file, save_safetensors, write_json

STATS_NAME = "stats.json"
PLAN_NAME = "cache_plan.json"
SKIPPED_NAME = "skipped.json"
SKIPPED_METADATA_KEY = "skipped"  # safetensors metadata of a shard: JSON list of [index, file, reason]

logger = logging.getLogger(__name__)


def shard_path(cache_dir: Path, index: int) -> Path:
    """The file of shard ``index``: items ``[index * shard_size, (index + 1) * shard_size)``."""
    return cache_dir / f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


class LatentMoments:
    """Float64 running sums over all (item, token) positions, per channel."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, latents: Tensor) -> None:
        """Add latents ``(n, L, H)`` (any float dtype)."""
        flat = latents.reshape(-1, latents.shape[-1]).double()
        self.count += flat.shape[0]
        self.sum += flat.sum(0)
        self.sum_sq += flat.pow(2).sum(0)

    def stats(self) -> dict:
        """``mean`` / ``std`` over every channel and ``channel_mean`` / ``channel_std`` (H values each)."""
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


# plan keys added after caches were first written: a stored plan without one was written before it existed
_PLAN_KEYS_ADDED_LATER = ("max_image_pixels",)


def _plan_changes(stored: dict, plan: dict) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` for every key where a cache's stored plan asks for other than ``plan``
    (its format version aside: a version-0 cache is completed as it is; keys it predates are not compared); [] when
    they ask for the same."""
    ignored = {FORMAT_KEY} | {key for key in _PLAN_KEYS_ADDED_LATER if key not in stored}
    keys = sorted((set(stored) | set(plan)) - ignored)
    return [(key, stored.get(key), plan.get(key)) for key in keys if stored.get(key) != plan.get(key)]


def _short(value: Any, width: int = 24) -> str:
    """``repr(value)`` cut to ``width`` characters (a path, a weights hash), for a one-line message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class LatentCacheWriter:
    """Writes a cache into ``cache_dir`` shard by shard, completing one a crash left unfinished.

    The plan: the dataset's ``num_items`` in shards of ``shard_size``, latents ``latent_shape`` ``(L, H)`` stored as
    ``dtype`` (with those of the flipped images when ``flip``), encoded by the tokenizer in directory ``tokenizer``
    whose weights have the fingerprint ``weights_sha256``, as posterior samples drawn from ``seed`` when
    ``sample_posterior``; ``dataset_settings``: those that decide which files are readable (``max_image_pixels``).
    A cache in ``cache_dir`` made with another plan is refused (``ValueError``), or with ``restart_if_stale``
    deleted; a folder another process holds (:func:`~maetok.runs.hold_folder`) is refused before it is read. The
    caller encodes the items (:meth:`shard_items`) of each shard that :meth:`resume_shard` does not find written,
    hands them to :meth:`write_shard`, and ends with :meth:`finish`, inside ``with writer.hold:`` (the folder is let
    go however that ends).
    """

    def __init__(self, cache_dir: Union[str, Path], *, num_items: int, shard_size: int, latent_shape: Sequence[int],
                 flip: bool, dtype: torch.dtype, tokenizer: Optional[Union[str, Path]], weights_sha256: str,
                 sample_posterior: bool, seed: int, dataset_settings: Optional[Mapping[str, Any]] = None,
                 restart_if_stale: bool = False):
        self.cache_dir = Path(cache_dir)
        # no other process writes into the folder until ``hold`` is let go (its ``with`` block) or the process ends
        self.hold = hold_folder(self.cache_dir, "caching latents")
        self.num_items, self.shard_size = num_items, shard_size
        self.num_shards = (num_items + shard_size - 1) // shard_size
        self.latent_shape = tuple(latent_shape)
        self.flip, self.dtype, self.sample_posterior = flip, dtype, sample_posterior
        self.plan = {
            FORMAT_KEY: FORMAT_VERSION,
            "num_items": num_items,
            "shard_size": shard_size,
            "flip": flip,
            "tokenizer": display_path(Path(tokenizer).resolve()) if tokenizer else None,  # as JSON holds it
            "dtype": str(dtype),
            "tokenizer_weights_sha256": weights_sha256,
            "sample_posterior": sample_posterior,
            "seed": seed if sample_posterior else None,
            **(dataset_settings or {}),
        }
        if sample_posterior:  # a posterior sample cache of an older maetok drew per shard: never completed with these
            self.plan["posterior_draws"] = "keyed by (seed, dataset index)"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.cache_dir / PLAN_NAME
        stored = read_cache_json(plan_path) if plan_path.exists() else None
        changes = _plan_changes(stored, self.plan) if stored is not None else []
        if changes:
            if not restart_if_stale:
                logger.info("%s: stored plan %s; new plan %s", plan_path, json.dumps(stored), json.dumps(self.plan))
                described = ", ".join(f"{key} {_short(old)} -> {_short(new)}" for key, old, new in changes)
                raise DataError(f"{self.cache_dir} holds a cache made with other settings or another tokenizer's "
                                f"weights ({described}; all in {PLAN_NAME}): use another --out or delete it")
            clear_held_folder(self.cache_dir)
        write_json(plan_path, self.plan)
        if (self.cache_dir / STATS_NAME).exists():
            os.remove(self.cache_dir / STATS_NAME)  # rewritten by finish(); its absence marks an unfinished cache
        self.moments = LatentMoments(self.latent_shape[-1])
        self.num_rows = 0
        self.skipped: list[SkippedItem] = []
        self.legacy_shards: list[int] = []  # shards written before skip lists existed

    def shard_items(self, shard: int) -> range:
        """The dataset items shard ``shard`` covers."""
        return range(shard * self.shard_size, min(self.num_items, (shard + 1) * self.shard_size))

    def resume_shard(self, shard: int) -> bool:
        """Whether shard ``shard`` is written already; if so its rows and skip list are counted in."""
        path = shard_path(self.cache_dir, shard)
        if not path.exists():
            return False
        done = load_file(str(path))["latents"]
        if len(done):
            self.moments.update(done)
        self.num_rows += len(done)
        shard_skips = read_shard_skips(path)
        if shard_skips is None:
            self.legacy_shards.append(shard)
        else:
            self.skipped.extend(SkippedItem(*item) for item in shard_skips)
        return True

    def write_shard(self, shard: int, latents: list[Tensor], flipped: list[Tensor], labels: list[Tensor],
                    rows: list[Tensor], skipped: Sequence[SkippedItem]) -> None:
        """Write shard ``shard`` (to a temporary file, then renamed) from its batches: ``latents`` / ``flipped``
        ``(b, L, H)`` each (``flipped`` ignored without flips), ``labels`` ``(b,)``, ``rows`` ``(b,)`` the position
        of each row among the shard's items; ``skipped``: its unreadable items, ``index`` a position among them."""
        first = shard * self.shard_size
        skips = [SkippedItem(first + item.index, item.file, item.reason) for item in skipped]
        empty = torch.empty(0, *self.latent_shape, dtype=self.dtype)
        tensors = {
            "latents": torch.cat(latents).to(self.dtype) if latents else empty,
            "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
            "indices": torch.cat(rows) + first if rows else torch.empty(0, dtype=torch.int64),
        }
        if self.flip:
            tensors["latents_flip"] = torch.cat(flipped).to(self.dtype) if flipped else tensors["latents"].clone()
        if latents:
            self.moments.update(tensors["latents"])
        self.num_rows += len(tensors["latents"])
        self.skipped.extend(skips)
        path = shard_path(self.cache_dir, shard)
        metadata = {SKIPPED_METADATA_KEY: json.dumps([[s.index, s.file, s.reason] for s in skips])}
        save_safetensors(tensors, path, metadata=metadata)

    def finish(self, image_size: int, in_channels: int, num_classes: int, class_names: Sequence[str]) -> Path:
        """Write ``skipped.json`` and ``stats.json`` (with the images' ``image_size`` / ``in_channels`` and the
        dataset's classes); returns the path of ``stats.json``. A cache without a single row is refused."""
        if self.num_rows == 0:
            raise DataError(f"none of the {self.num_items} images of the dataset could be read: no latents to cache "
                            f"in {self.cache_dir}")
        log_skipped_items(self.skipped, f"the latent cache {self.cache_dir}")
        if self.legacy_shards:
            print(f"[maetok] {self.cache_dir}: shard(s) {self.legacy_shards} were written by an older maetok that "
                  "replaced unreadable files by a neighbour; those are not listed in skipped.json")
        write_json(self.cache_dir / SKIPPED_NAME, {
            FORMAT_KEY: FORMAT_VERSION,
            "num_skipped": len(self.skipped),
            "skipped": [item.to_dict() for item in self.skipped],
            "shards_without_skip_list": self.legacy_shards,
        })
        stats = {
            FORMAT_KEY: FORMAT_VERSION,
            "num_items": self.num_rows,
            "num_listed_items": self.num_items,
            "num_skipped_images": len(self.skipped),
            "skipped_list": SKIPPED_NAME,
            "num_shards": self.num_shards,
            "latent_shape": list(self.latent_shape),
            "flip": self.flip,
            "sample_posterior": self.sample_posterior,
            "tokenizer": self.plan["tokenizer"],
            "image_size": image_size,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "class_names": list(class_names),
            **self.moments.stats(),
        }
        return write_json(self.cache_dir / STATS_NAME, stats)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_cache_json(path: Path) -> dict:
    """A cache's JSON file (plan, statistics, skip list) with its format version checked; a truncated or corrupt one
    is a one-line ``DataError`` naming it and what to do (:func:`maetok.runs.read_json_file`)."""
    what_to_do = {PLAN_NAME: f"delete {path.parent} and run cache-latents again",
                  STATS_NAME: "delete it and rerun cache-latents, which completes the cache and writes it again",
                  SKIPPED_NAME: "delete stats.json and it, and rerun cache-latents, which writes both again"}[path.name]
    data = read_json_file(path, DataError, what_to_do)
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object: {what_to_do}")
    check_format_version(data, path)
    return data


def read_latent_stats(cache_dir: Union[str, Path]) -> dict:
    path = Path(cache_dir) / STATS_NAME
    if not path.exists():
        raise MissingFileError(
            f"{path} not found: {cache_dir} is not a finished latent cache (run `maetok cache-latents` to create "
            "or complete it)"
        )
    return read_cache_json(path)


def read_shard_skips(path: Path) -> list[tuple[int, str, str]] | None:
    """The unreadable items ``(dataset index, file, reason)`` recorded in a shard's metadata; None for a shard
    written before skip lists existed."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if SKIPPED_METADATA_KEY not in metadata:
        return None
    return [(int(index), str(file), str(reason)) for index, file, reason in json.loads(metadata[SKIPPED_METADATA_KEY])]


def read_skipped(cache_dir: Union[str, Path]) -> list[dict]:
    """The items a finished cache left out (``skipped.json``): ``{"index", "file", "reason"}`` each; [] for a cache
    written before skip lists existed."""
    path = Path(cache_dir) / SKIPPED_NAME
    if not path.exists():
        return []
    return list(read_cache_json(path)["skipped"])


class LatentDataset(Dataset):
    """A finished latent cache in memory. Items: ``(latents (2, L, H), label)`` where the first slot holds
    the latents and the second those of the flipped image (the same latents again when the cache has no
    flips); the trainer picks one slot per item with a draw keyed by (seed, step, global position) (exact resume). ``item_indices``: the
    dataset item of each row (None when a shard predates it)."""

    def __init__(self, cache_dir: Union[str, Path]):
        self.cache_dir = Path(cache_dir)
        self.stats = read_latent_stats(self.cache_dir)
        latents, flipped, labels, indices = [], [], [], []
        for shard in range(self.stats["num_shards"]):
            path = shard_path(self.cache_dir, shard)
            if not path.exists():
                raise MissingFileError(f"latent cache {self.cache_dir} lacks {path.name}")
            tensors = load_file(str(path))
            latents.append(tensors["latents"])
            flipped.append(tensors.get("latents_flip", tensors["latents"]))
            labels.append(tensors["labels"])
            indices.append(tensors.get("indices"))
        self.latents = torch.cat(latents)
        self.latents_flip = torch.cat(flipped)
        self.labels = torch.cat(labels)
        self.item_indices = None if any(i is None for i in indices) else torch.cat(indices)
        if len(self.latents) != self.stats["num_items"]:
            raise DataError(f"{self.cache_dir}: {len(self.latents)} latents, stats.json says {self.stats['num_items']}")
        self.num_classes = self.stats["num_classes"]
        self.class_names = self.stats["class_names"]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.stack([self.latents[index], self.latents_flip[index]]), int(self.labels[index])


class LatentNormalizer:
    """``(x - mean) / std`` with scalar or per-channel statistics from a cache's ``stats.json``."""

    def __init__(self, stats: dict, mode: str = "channel"):
        if mode == "channel":
            self.mean = torch.tensor(stats["channel_mean"], dtype=torch.float32)
            self.std = torch.tensor(stats["channel_std"], dtype=torch.float32).clamp_min(1e-6)
        elif mode == "scalar":
            self.mean = torch.tensor(stats["mean"], dtype=torch.float32)
            self.std = torch.tensor(max(stats["std"], 1e-6), dtype=torch.float32)
        elif mode == "none":
            self.mean, self.std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            raise DataError(f"latent normalisation must be 'channel', 'scalar' or 'none', got {mode!r}")
        self.mode = mode

    def normalize(self, latents: Tensor) -> Tensor:
        return (latents - self.mean.to(latents.device)) / self.std.to(latents.device)

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents * self.std.to(latents.device) + self.mean.to(latents.device)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "LatentNormalizer":
        norm = cls.__new__(cls)
        norm.mode = data["mode"]
        norm.mean = torch.tensor(data["mean"], dtype=torch.float32)
        norm.std = torch.tensor(data["std"], dtype=torch.float32)
        return norm
