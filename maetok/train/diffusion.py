"""Training SiT / LightningDiT on a latent cache (``maetok train-diffusion``).

A run directory holds ``config.yaml``, ``log.csv``, ``checkpoints/last.pt``, periodic ``samples_step*.png``
grids decoded through the cache's tokenizer, and ``model/`` (the EMA model, see
:class:`maetok.diffusion.generator.LatentGenerator`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from maetok.config import DiffusionTrainConfig
from maetok.data import ItemBatch
from maetok.data.latents import LatentDataset, LatentNormalizer
from maetok.diffusion.generator import LatentGenerator
from maetok.diffusion.transport import training_loss
from maetok.errors import ConfigError
from maetok.models.sit import build_diffusion_model
from maetok.models.tokenizer import MAETok
from maetok.train.loop import Trainer, autocast, flip_mask


class DiffusionTrainer(Trainer):
    run_kind = "diffusion"

    def __init__(
        self,
        cfg: DiffusionTrainConfig,
        out_dir: Union[str, Path],
        resume: bool = False,
        device: Optional[str] = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
    ):
        cfg.validate()
        if not cfg.latents:
            raise ConfigError("no latent cache given: pass --latents DIR (made by `maetok cache-latents`)")
        super().__init__(cfg, out_dir, optim=cfg.optim, total_steps=cfg.train.steps, inputs=[cfg.latents],
                         device=device, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
        self.train_set = LatentDataset(cfg.latents)
        stats = self.train_set.stats
        # the architecture on this cache's latents and classes (model.latent_dim / num_latent_tokens / num_classes;
        # no classes when model.conditional is false)
        self.model_cfg = cfg.model.for_latents(stats["latent_shape"], stats["num_classes"])
        self.latent_shape = self.model_cfg.latent_shape
        self.num_classes = self.model_cfg.num_classes
        if self.num_classes and int(self.train_set.labels.min()) < 0:
            raise ConfigError(
                f"{cfg.latents} has unlabelled items (label -1): train an unconditional model (model.conditional=false)"
            )
        self.normalizer = LatentNormalizer(stats, cfg.transport.latent_norm)
        torch.manual_seed(cfg.train.seed)
        model = build_diffusion_model(self.model_cfg)
        self.label_dropout = model.y_embedder.dropout_prob if model.y_embedder is not None else 0.0
        self.setup_optimization(model, resume)
        self.tokenizer: Optional[MAETok] = None
        tok_dir = stats.get("tokenizer")
        if tok_dir and Path(tok_dir, "config.json").exists():
            self.tokenizer = MAETok.from_pretrained(tok_dir).to(self.device)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"diffusion: {self.model_cfg.size_name} ({self.model_cfg.arch}, {params:.2f}M) on {len(self.train_set)} latents "
            f"{self.latent_shape}, {self.num_classes or 'no'} classes; device {self.device}"
        )

    def train_step(self, batch: ItemBatch) -> dict[str, float]:
        pairs, labels = batch.images, batch.labels  # pairs: (B, 2, L, H) = (latents, latents of the flipped image)
        draws = self.sample_random(batch)  # flips, times, noise, label dropout: per sample
        if self.cfg.train.flip:
            pick = flip_mask(draws).long()
        else:
            pick = torch.zeros(pairs.shape[0], dtype=torch.long)
        latents = pairs[torch.arange(pairs.shape[0]), pick].to(self.device, non_blocking=True)
        x0 = self.normalizer.normalize(latents)
        y = labels.to(self.device) if self.num_classes else None
        with autocast(self.cfg.train.precision, self.device):
            loss, terms = training_loss(
                self.ddp_model,
                x0,
                y,
                draws=draws,
                time_sampling=self.cfg.transport.time_sampling,
                cosine_loss_weight=self.cfg.transport.cosine_loss_weight,
                label_dropout=self.label_dropout,
            )
        logs = {k: float(v) for k, v in terms.items()}
        logs.update(self.optimizer_step(loss))
        return logs

    def pipeline(self) -> LatentGenerator:
        """The EMA model (or live weights without EMA) as a sampling pipeline."""
        model = build_diffusion_model(self.model_cfg).to(self.device)
        model.load_state_dict(self.ema_or_live_state())
        return LatentGenerator(
            model.eval(),
            self.normalizer,
            list(self.train_set.class_names),
            self.cfg.sampling,
            self.train_set.stats.get("tokenizer"),
        )

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """A sample grid (one row per class, up to 10 classes x 8) decoded through the tokenizer."""
        if self.tokenizer is None:
            return {}
        pipe = self.pipeline()
        rows = min(self.num_classes, 10) if self.num_classes else 4
        labels = torch.arange(rows).repeat_interleave(8) if self.num_classes else None
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        latents = pipe.sample_latents(labels, rows * 8, generator=generator, steps=self.cfg.sampling.grid_steps)
        images = self.tokenizer.decode(latents).clamp(-1, 1)
        self.save_grid(images.cpu(), self.out_dir / f"samples_step{step:07d}.png", 8, "samples")
        return {}

    def export(self) -> Path:
        pipe = self.pipeline()
        return pipe.save(self.model_dir)
