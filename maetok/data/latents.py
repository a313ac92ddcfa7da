"""Latent caches, the reading side: a dataset encoded once by a tokenizer, for diffusion training (written by
:func:`maetok.encode.cache_latents`; this module knows no model).

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
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from maetok.runs import check_format_version

STATS_NAME = "stats.json"
PLAN_NAME = "cache_plan.json"
SKIPPED_NAME = "skipped.json"
SKIPPED_METADATA_KEY = "skipped"  # safetensors metadata of a shard: JSON list of [index, file, reason]


def shard_path(cache_dir: Path, index: int) -> Path:
    """The file of shard ``index``: items ``[index * shard_size, (index + 1) * shard_size)``."""
    return cache_dir / f"shard-{index:05d}.safetensors"


def read_latent_stats(cache_dir: Union[str, Path]) -> dict:
    path = Path(cache_dir) / STATS_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {cache_dir} is not a finished latent cache (run `maetok cache-latents` to create "
            "or complete it)"
        )
    stats = json.loads(path.read_text())
    check_format_version(stats, path)
    return stats


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
    data = json.loads(path.read_text())
    check_format_version(data, path)
    return list(data["skipped"])


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
                raise FileNotFoundError(f"latent cache {self.cache_dir} lacks {path.name}")
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
            raise ValueError(f"{self.cache_dir}: {len(self.latents)} latents, stats.json says {self.stats['num_items']}")
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
            raise ValueError(f"latent normalisation must be 'channel', 'scalar' or 'none', got {mode!r}")
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
