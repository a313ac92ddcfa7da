"""Training the tokenizer: stage 1 (mask modeling + auxiliary decoders) and stage 2 (pixel-decoder
fine-tuning with a frozen encoder and a linearly decaying mask ratio).

A run directory holds::

    config.yaml              the full resolved config of the run
    log.csv                  one row per logged step (losses, lr, img/s, eval PSNR)
    checkpoints/last.pt      model, EMA, optimizer, discriminator and step (resume with --resume)
    model/                   the exported tokenizer: config.json + model.safetensors (EMA weights)
    recon_step*.png          reconstruction grids (top: originals, bottom: reconstructions)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from maetok.config import TokenizerTrainConfig, from_dict, read_yaml_file, to_dict
from maetok.data import ItemBatch, build_dataset, data_shape, dataset_labels, draw_order, load_images
from maetok.data.images import to_uint8
from maetok.errors import ConfigError, MissingFileError
from maetok.eval.metrics import psnr
from maetok.losses.objective import TokenizerObjective
from maetok.global_batch import broadcast_module
from maetok.models.tokenizer import MAETok
from maetok.runs import check_apart, model_directory, run_directory
from maetok.targets import build_target
from maetok.train.loop import CHECKPOINT, Trainer, autocast, flip_mask, load_checkpoint

#: what a stage-1 run never reads: its config may differ there from a later run's (one stage 1 serves several stage 2s)
PRETRAIN_UNUSED_SECTIONS = ("finetune.",)
#: the preset whose training settings (optimizer, losses, stage 2) fine-tune a tokenizer that comes without a run
#: config (a model folder, the authors' released folder or a hub id); its model section is the tokenizer's own
PRETRAINED_FINETUNE_PRESET = "maetok-b-128"


def read_run_config(run_dir: Union[str, Path]) -> TokenizerTrainConfig:
    """The config of a stage-1 run directory; for a tokenizer without a run (a model folder of either format or a
    hub id): :data:`PRETRAINED_FINETUNE_PRESET`'s training settings around the tokenizer's own model config. A
    released tokenizer's config has no masking (its encoder's mask token is not loaded): stage 2 then fine-tunes
    the decoder on unmasked latents."""
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        return from_dict(TokenizerTrainConfig, read_yaml_file(path, "restore it, or train stage 1 again"), where=str(path))
    from maetok.config import load_config
    from maetok.model_folders import tokenizer_config

    try:
        model_config = tokenizer_config(run_dir)
    except FileNotFoundError:
        raise MissingFileError(f"{path} not found: {run_dir} is neither a tokenizer run directory nor a tokenizer "
                               "folder or hub id") from None
    return dataclasses.replace(load_config(TokenizerTrainConfig, PRETRAINED_FINETUNE_PRESET), model=model_config)


def build_objective(
    cfg: TokenizerTrainConfig, with_targets: bool, device: torch.device, **adversarial_overrides
) -> TokenizerObjective:
    """Targets, LPIPS and the adversarial loss, each only when configured. ``adversarial_overrides``: keywords
    of :class:`~maetok.losses.adversarial.AdversarialLoss` (e.g. ``start_step``) that replace the config's."""
    m = cfg.model
    targets = {}
    if with_targets:
        for t in m.aux_targets:
            targets[t.name] = build_target(t.name, m.image_size, m.patch_size, m.in_channels, **t.options)
    perceptual = adversarial = None
    if cfg.loss.perceptual_weight > 0:
        from maetok.losses.perceptual import LPIPS

        perceptual = LPIPS()
    if cfg.loss.gan_weight > 0:
        from maetok.losses.adversarial import build_adversarial_loss

        adversarial = build_adversarial_loss(
            cfg.loss, cfg.optim, in_channels=m.in_channels, image_size=m.image_size, **adversarial_overrides
        )
    objective = TokenizerObjective(cfg.loss, targets, m.aux_targets, m.variant, perceptual, adversarial)
    return objective.to(device)


def stage1_discriminator(source: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint of the stage-1 run behind ``source`` (its run directory or its ``model/`` folder) and the
    state of the discriminator it trained, or ``(path or None, None)`` when there is none: an exported model
    without its run, a run without a GAN, or one stopped before the discriminator's first step."""
    run_dir = source if (source / CHECKPOINT).exists() else run_directory(source)
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None, None
    state = load_checkpoint(path)
    if state.get("kind") != "tokenizer-pretrain":
        return path, None
    adversarial = (state.get("extra") or {}).get("adversarial")
    if adversarial is None or int(adversarial.get("lecam.num_updates", 0)) == 0:
        return path, None
    return path, adversarial


def new_discriminator_schedule(warmup_steps: int) -> str:
    """How stage 2 trains a discriminator that stage 1 did not train (``finetune.disc_warmup_steps``), in words."""
    if warmup_steps <= 0:
        return ("a new discriminator trains from step 0 and its adversarial loss reaches the decoder from step 0 "
                "(finetune.disc_warmup_steps=0: no warm-up)")
    return (f"a new discriminator trains alone for the first {warmup_steps} steps (finetune.disc_warmup_steps) "
            "before its adversarial loss reaches the decoder")


class TokenizerTrainer(Trainer):
    """One training run of one stage. ``stage``: ``"pretrain"`` (stage 1) or ``"finetune"`` (stage 2,
    which needs ``init_from``: a stage-1 run directory or exported model directory)."""

    def __init__(
        self,
        cfg: TokenizerTrainConfig,
        out_dir: Union[str, Path],
        stage: str = "pretrain",
        init_from: Optional[Union[str, Path]] = None,
        resume: bool = False,
        device: Optional[str] = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
    ):
        if stage not in ("pretrain", "finetune"):
            raise ConfigError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        if stage == "finetune" and init_from is None:
            raise ConfigError("stage 2 (finetune) needs init_from: the stage-1 run or model directory")
        cfg.validate()
        self.stage = stage
        self.run_kind = f"tokenizer-{stage}"
        self.init_from = init_from
        optim = cfg.optim
        if stage == "finetune":
            optim = dataclasses.replace(cfg.optim, lr=cfg.finetune.lr, warmup_steps=cfg.finetune.warmup_steps)
        total = cfg.train.steps if stage == "pretrain" else cfg.finetune.steps
        check_apart(out_dir, cfg.data.dataset, "--out", "data.dataset")  # its PNGs would become rows
        inputs = [Path(p) for p in (cfg.data.dataset, init_from) if p is not None and Path(p).exists()]
        unused = PRETRAIN_UNUSED_SECTIONS if stage == "pretrain" else ()
        super().__init__(cfg, out_dir, optim=optim, total_steps=total, inputs=inputs, device=device, resume=resume,
                         overwrite=overwrite, allow_config_change=allow_config_change, unused_config_sections=unused)
        m = cfg.model
        if stage == "finetune":  # stage 2 trains the decoder the encoder was trained for: on images of its channels
            data_channels = data_shape(cfg.data.dataset, m.image_size, m.patch_size).channels
            if data_channels != m.in_channels:
                raise ConfigError(f"{init_from} is a tokenizer of {m.in_channels}-channel images and "
                                  f"{cfg.data.dataset} holds {'colour' if data_channels == 3 else 'grayscale'} images "
                                  f"({data_channels} channel{'s' if data_channels > 1 else ''}): fine-tune it on data "
                                  "of its channels, or train a new tokenizer on this data (train-tokenizer)")
        # the caption target needs (image, label, caption) items; only stage 1 trains auxiliary decoders
        self.uses_captions = stage == "pretrain" and any(t.name == "text" for t in m.aux_targets)
        caption_options = {"return_captions": True} if self.uses_captions else {}
        pixels = {"max_image_pixels": cfg.data.max_image_pixels}
        self.train_set = build_dataset(cfg.data.dataset, "train", m.image_size, m.in_channels, **caption_options, **pixels)
        self.eval_set = build_dataset(cfg.data.dataset, "test", m.image_size, m.in_channels, **pixels)
        # a seeded draw holding every class equally (a class-sorted folder's first images are its first classes)
        order, limit = draw_order(len(self.eval_set), cfg.data.eval_images, 0, dataset_labels(self.eval_set))
        self.eval_images, _ = load_images(self.eval_set, order, limit=limit)

        torch.manual_seed(cfg.train.seed)
        if stage == "pretrain":
            self.objective = build_objective(cfg, with_targets=True, device=self.device)
        else:
            self.objective = self._finetune_objective(Path(init_from))
        targets = self.objective.targets
        model = MAETok(
            m,
            {name: t.dim for name, t in targets.items()},
            {name: t.context_length for name, t in targets.items() if hasattr(t, "context_length")},
        )
        if stage == "finetune":
            model = self._load_stage1_weights(model, init_from)
            model.encoder.requires_grad_(False)
            if cfg.finetune.fresh_decoder:  # a newly initialised decoder (seeded by train.seed) on the frozen encoder
                model.decoder.load_state_dict(model.untrained_copy().decoder.state_dict())
        self.setup_optimization(model, resume)
        if self.objective.adversarial is not None:  # every process starts from rank 0's discriminator
            broadcast_module(self.objective.adversarial)

    def _finetune_objective(self, source: Path) -> TokenizerObjective:
        """Stage 2's objective. The discriminator trains from step 0: it continues stage 1's (weights, optimizer,
        LeCAM anchors) when stage 1 trained one, and the adversarial loss then reaches the decoder from step 0;
        otherwise a new discriminator first trains alone for ``finetune.disc_warmup_steps``."""
        cfg = self.cfg
        if cfg.loss.gan_weight <= 0:
            return build_objective(cfg, with_targets=False, device=self.device)
        checkpoint, stage1_state = stage1_discriminator(source)
        warmup = 0 if stage1_state is not None else cfg.finetune.disc_warmup_steps
        objective = build_objective(cfg, with_targets=False, device=self.device, start_step=0, generator_start_step=warmup)
        if stage1_state is not None:
            try:
                objective.adversarial.load_state_dict(stage1_state)
            except (RuntimeError, KeyError, ValueError) as err:
                first = str(err).strip().splitlines()[0]
                raise ConfigError(
                    f"the discriminator in {checkpoint} does not fit this run's loss.gan_backbone="
                    f"{cfg.loss.gan_backbone!r} ({first})"
                ) from None
            self._announce(f"stage 2 continues stage 1's discriminator and its optimizer ({checkpoint})")
        else:
            self._announce(f"stage 1 ({source}) trained no discriminator: {new_discriminator_schedule(warmup)}")
        return objective

    def _announce(self, message: str) -> None:
        if self.dist.is_main:
            print(f"[maetok] {message}")

    def _load_stage1_weights(self, model: MAETok, source: Union[str, Path]) -> MAETok:
        """``model`` with the stage-1 weights of ``source``; a tokenizer of another architecture (the authors'
        released one) is used as loaded."""
        stage1 = MAETok.from_pretrained(source)
        if to_dict(stage1.config) | {"aux_targets": []} != to_dict(self.cfg.model) | {"aux_targets": []}:
            raise ConfigError(f"the tokenizer in {model_directory(source)} was built with a different model config "
                              "than this run")
        if type(stage1) is not type(model):
            return stage1.train()
        model.load_state_dict(stage1.state_dict(), strict=True)
        return model

    def describe(self) -> str:
        counts = {k: f"{v / 1e6:.2f}M" for k, v in self.model.parameter_counts().items()}
        return f"{self.run_kind}: {counts}; {len(self.train_set)} training images; device {self.device}"

    def extra_state(self) -> dict:
        return self.objective.training_state()

    def load_extra_state(self, state: dict) -> None:
        self.objective.load_training_state(state)

    # -- the step ----------------------------------------------------------------------------------------

    def mask_ratio(self, step: int):
        """Stage 1: a per-image ratio in [min, max] (None when masking is off). Stage 2: the linear decay."""
        m, f = self.cfg.model, self.cfg.finetune
        if self.stage == "pretrain":
            return (m.mask_ratio_min, m.mask_ratio_max) if m.mask_ratio_max > 0 else None
        if m.mask_ratio_max <= 0:  # a model trained without masking is fine-tuned without masking
            return None
        progress = min(1.0, step / max(1, f.mask_decay_steps))
        ratio = f.mask_ratio_start + (f.mask_ratio_end - f.mask_ratio_start) * progress
        return ratio if ratio > 0 else None

    def train_step(self, batch: ItemBatch) -> dict[str, float]:
        precision = self.cfg.train.precision
        images = batch.images.to(self.device, non_blocking=True)
        draws = self.sample_random(batch)  # flips, masks, VAE noise, DiffAugment: per image
        if self.cfg.train.flip:
            flips = flip_mask(draws, self.device).view(-1, 1, 1, 1)
            images = torch.where(flips, images.flip(-1), images)
        with autocast(precision, self.device):
            out = self.ddp_model(images, self.mask_ratio(self.step), draws)
        captions = None
        if self.uses_captions:
            captions = self.objective.targets["text"].tokenize(batch.captions).to(self.device)
        loss, logs = self.objective.generator_loss(
            out, images, self.step, self.model.last_decoder_layer(), captions=captions, draws=draws
        )
        logs.update(self.optimizer_step(loss))
        with autocast(precision, self.device):
            logs.update(
                self.objective.discriminator_step(
                    images, out.reconstruction.detach(), self.step, self.lr_factor(), draws=draws
                )
            )
        if out.mask is not None:
            logs["mask_ratio"] = out.mask.float().mean().item()
        return logs

    # -- evaluation and export ---------------------------------------------------------------------------

    def inference_model(self) -> MAETok:
        """The tokenizer with EMA weights (or the live weights without EMA), on the training device."""
        model = self.model.untrained_copy().to(self.device)
        state = self.ema_or_live_state()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux_decoders.")})
        return model.eval()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.inference_model()
        images = self.eval_images.to(self.device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)
        grid_path = self.out_dir / f"recon_{self.stage}_step{step:07d}.png"
        self.save_grid(torch.cat([images, recon]).cpu(), grid_path, min(16, len(images)), f"reconstructions/{self.stage}")
        return {"eval_psnr": psnr(to_uint8(images.cpu()), to_uint8(recon.cpu())), "eval_images": len(images)}

    def export(self) -> Path:
        """Write the EMA tokenizer to ``out_dir/model`` (config.json + model.safetensors), with its scalar latent
        statistics measured on a sample of the training images seeded by ``train.seed``
        (:func:`maetok.encode.latent_statistics`; a released tokenizer keeps the authors' own)."""
        from maetok.encode import latent_statistics

        model = self.inference_model()
        if model.latent_mean is None:
            model.latent_mean, model.latent_std = latent_statistics(model, self.train_set, seed=self.cfg.train.seed)
        return model.save_pretrained(self.model_dir)
