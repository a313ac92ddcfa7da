"""Latent caches: a dataset encoded once by a tokenizer, for diffusion training.

A cache directory holds::

    cache_plan.json               the settings of the cache (flip, VAE posterior sampling and its seed, ...) and a
                                  hash of the tokenizer's weights (a rerun with other settings or another
                                  tokenizer is refused, or restarts on request)
    shard-00000.safetensors ...   "latents" (n, L, H) [+ "latents_flip" (n, L, H)], "labels" (n,) int64
    stats.json                    item count, latent shape, scalar and per-channel mean/std, the tokenizer
                                  directory, class names; written last, so its presence means "complete"

Shard ``i`` holds dataset items ``[i * shard_size, (i + 1) * shard_size)``; each shard is written to a
temporary file and renamed, so a crash leaves no half-written shard and a rerun skips the finished ones.

A VAE's latents are by default a sample of its posterior (DiT / SiT practice: the diffusion model learns the
distribution the decoder was trained on), drawn per shard from ``(seed, shard)`` so a resumed cache equals an
uninterrupted one; ``sample_posterior=False`` stores the posterior mean.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from maetok.models.tokenizer import MAETok

STATS_NAME = "stats.json"


def _shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.safetensors"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Moments:
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
def cache_latents(
    tokenizer: MAETok,
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
    (default for a VAE; drawn from ``seed``) rather than its mean; only a VAE has a posterior to sample.
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
    plan = {
        "num_items": len(dataset),
        "shard_size": shard_size,
        "flip": flip,
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
        "dtype": str(dtype),
        "tokenizer_weights_sha256": weights_fingerprint(tokenizer),
        "sample_posterior": sample_posterior,
        "seed": seed if sample_posterior else None,
    }
    plan_path = out_dir / "cache_plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
        if not restart_if_stale:
            raise ValueError(
                f"{out_dir} holds a cache made with other settings or another tokenizer's weights "
                f"({plan_path.read_text().strip()}); use another --out or delete it"
            )
        shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    plan_path.write_text(json.dumps(plan, indent=2))
    if (out_dir / STATS_NAME).exists():
        os.remove(out_dir / STATS_NAME)  # rewritten at the end; its absence marks an unfinished cache
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    num_items = len(dataset)
    num_shards = (num_items + shard_size - 1) // shard_size
    moments = _Moments(tokenizer.config.latent_dim)
    bar = tqdm(total=num_items, desc="cache latents", unit="img", disable=not progress)
    for shard in range(num_shards):
        path = _shard_path(out_dir, shard)
        indices = range(shard * shard_size, min(num_items, (shard + 1) * shard_size))
        if path.exists():
            moments.update(load_file(str(path))["latents"])
            bar.update(len(indices))
            continue
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
        latents, flipped, labels = [], [], []
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            latents.append(tokenizer.encode(images, sample=sample_posterior, generator=generator).float().cpu())
            if flip:
                flipped.append(
                    tokenizer.encode(images.flip(-1), sample=sample_posterior, generator=generator).float().cpu()
                )
            labels.append(torch.as_tensor(batch[1], dtype=torch.int64))
            bar.update(images.shape[0])
        tensors = {"latents": torch.cat(latents).to(dtype), "labels": torch.cat(labels)}
        if flip:
            tensors["latents_flip"] = torch.cat(flipped).to(dtype)
        moments.update(tensors["latents"])
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    bar.close()
    cfg = tokenizer.config
    stats = {
        "num_items": num_items,
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
    if hasattr(dataset, "log_skipped"):  # unreadable files met while encoding (by this invocation)
        stats["num_skipped_images"] = dataset.log_skipped()
    tmp = out_dir / (STATS_NAME + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, out_dir / STATS_NAME)
    return out_dir / STATS_NAME


def read_latent_stats(cache_dir: Union[str, Path]) -> dict:
    path = Path(cache_dir) / STATS_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {cache_dir} is not a finished latent cache (run `maetok cache-latents` to create "
            "or complete it)"
        )
    return json.loads(path.read_text())


class LatentDataset(Dataset):
    """A finished latent cache in memory. Items: ``(latents (2, L, H), label)`` where the first slot holds
    the latents and the second those of the flipped image (the same latents again when the cache has no
    flips); the trainer picks one slot per item with its own generator (exact resume)."""

    def __init__(self, cache_dir: Union[str, Path]):
        self.cache_dir = Path(cache_dir)
        self.stats = read_latent_stats(self.cache_dir)
        latents, flipped, labels = [], [], []
        for shard in range(self.stats["num_shards"]):
            path = _shard_path(self.cache_dir, shard)
            if not path.exists():
                raise FileNotFoundError(f"latent cache {self.cache_dir} lacks {path.name}")
            tensors = load_file(str(path))
            latents.append(tensors["latents"])
            flipped.append(tensors.get("latents_flip", tensors["latents"]))
            labels.append(tensors["labels"])
        self.latents = torch.cat(latents)
        self.latents_flip = torch.cat(flipped)
        self.labels = torch.cat(labels)
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
