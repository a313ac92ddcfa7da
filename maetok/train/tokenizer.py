"""Training the tokenizer: stage 1 (mask modeling + auxiliary decoders) and stage 2 (pixel-decoder
fine-tuning with a frozen encoder and a linearly decaying mask ratio).

A run directory holds::

    config.yaml              the full resolved config of the run
    log.csv                  one row per logged step (losses, lr, img/s, eval PSNR)
    checkpoints/last.pt      model, EMA, optimizer, discriminator, step and RNG state (resume with --resume)
    model/                   the exported tokenizer: config.json + model.safetensors (EMA weights)
    recon_step*.png          reconstruction grids (top: originals, bottom: reconstructions)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Union

import torch
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from maetok.config import TokenizerTrainConfig, from_dict, to_dict
from maetok.data import build_dataset, random_hflip, save_image_grid
from maetok.eval.metrics import psnr, to_uint8
from maetok.losses.objective import TokenizerObjective
from maetok.models.tokenizer import MAETok
from maetok.targets import build_target
from maetok.train.loop import (
    EMA,
    RunLog,
    atomic_torch_save,
    autocast,
    batch_stream,
    load_checkpoint,
    lr_factor,
    make_adamw,
    mean_across_processes,
    set_lr,
    setup_distributed,
    unwrap,
)

CHECKPOINT = Path("checkpoints") / "last.pt"


def read_run_config(run_dir: Union[str, Path]) -> TokenizerTrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a tokenizer run directory?")
    return from_dict(TokenizerTrainConfig, yaml.safe_load(path.read_text()), where=str(path))


def build_objective(cfg: TokenizerTrainConfig, with_targets: bool, device: torch.device) -> TokenizerObjective:
    """Targets, LPIPS and the adversarial loss, each only when configured."""
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

        adversarial = build_adversarial_loss(cfg.loss, cfg.optim, in_channels=m.in_channels, image_size=m.image_size)
    objective = TokenizerObjective(cfg.loss, targets, m.aux_targets, m.variant, perceptual, adversarial)
    return objective.to(device)


class TokenizerTrainer:
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
    ):
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        if stage == "finetune" and init_from is None:
            raise ValueError("stage 2 (finetune) needs init_from: the stage-1 run or model directory")
        cfg.validate()
        self.cfg = cfg
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.dist = setup_distributed(device)
        self.device = self.dist.device
        self.total_steps = cfg.train.steps if stage == "pretrain" else cfg.finetune.steps
        self.optim_cfg = cfg.optim
        if stage == "finetune":
            self.optim_cfg = dataclasses.replace(cfg.optim, lr=cfg.finetune.lr, warmup_steps=cfg.finetune.warmup_steps)
        m = cfg.model
        self.train_set = build_dataset(cfg.data.dataset, "train", m.image_size, m.in_channels)
        self.eval_set = build_dataset(cfg.data.dataset, "test", m.image_size, m.in_channels)

        torch.manual_seed(cfg.train.seed)
        # stage 2 starts after stage 1's discriminator warm-up: the adversarial term is on from its step 0
        objective_cfg = cfg if stage == "pretrain" else dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, gan_start=0))
        self.objective = build_objective(objective_cfg, with_targets=stage == "pretrain", device=self.device)
        aux_dims = {name: t.dim for name, t in self.objective.targets.items()}
        model = MAETok(m, aux_dims)
        if stage == "finetune":
            self._load_stage1_weights(model, Path(init_from))
            model.encoder.requires_grad_(False)
        self.model = model.to(self.device)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.trainable, self.optim_cfg)
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.dist.rank)
        self.step = 0
        if resume:
            self._resume()
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        n_eval = min(cfg.data.eval_images, len(self.eval_set))
        self.eval_images = torch.stack([self.eval_set[i][0] for i in range(n_eval)])

    # -- set-up helpers ----------------------------------------------------------------------------------

    def _load_stage1_weights(self, model: MAETok, source: Path) -> None:
        model_dir = source / "model" if (source / "model" / "config.json").exists() else source
        stage1 = MAETok.from_pretrained(model_dir)
        if to_dict(stage1.config) | {"aux_targets": []} != to_dict(self.cfg.model) | {"aux_targets": []}:
            raise ValueError(f"the tokenizer in {model_dir} was built with a different model config than this run")
        model.load_state_dict(stage1.state_dict(), strict=True)

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if self.dist.is_main:
                print(f"[maetok] --resume: no checkpoint at {path}, starting from step 0")
            return
        state = load_checkpoint(path)
        if state.get("stage") != self.stage:
            raise ValueError(f"{path} is a {state.get('stage')!r} checkpoint, this run is {self.stage!r}")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_training_state(state["objective"])
        self.generator.set_state(state["generator"][self.dist.rank])
        self.step = int(state["step"])
        if self.dist.is_main:
            print(f"[maetok] resumed from {path} at step {self.step}")

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

    def train_step(self, images: Tensor) -> dict[str, float]:
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        if cfg.train.flip:
            images = random_hflip(images, self.generator)
        lr = self.optim_cfg.lr * lr_factor(self.step, self.optim_cfg, self.total_steps)
        set_lr(self.optimizer, lr)
        with autocast(cfg.train.precision, self.device):
            out = self.ddp_model(images, self.mask_ratio(self.step), self.generator)
        loss, logs = self.objective.generator_loss(out, images, self.step, self.model.last_decoder_layer())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim_cfg.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, self.optim_cfg.grad_clip).item()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        with autocast(cfg.train.precision, self.device):
            logs.update(self.objective.discriminator_step(images, out.reconstruction.detach(), self.step))
        logs["lr"] = lr
        if out.mask is not None:
            logs["mask_ratio"] = out.mask.float().mean().item()
        return logs

    # -- evaluation and persistence ----------------------------------------------------------------------

    def inference_model(self) -> MAETok:
        """The tokenizer with EMA weights (or the live weights without EMA), on the training device."""
        model = MAETok(self.cfg.model).to(self.device)
        state = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux_decoders.")})
        return model.eval()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.inference_model()
        images = self.eval_images.to(self.device)
        recon = model.decode(model.encode(images)).clamp(-1, 1)
        save_image_grid(torch.cat([images, recon]).cpu(), self.out_dir / f"recon_{self.stage}_step{step:07d}.png", nrow=min(16, len(images)))
        return {"eval_psnr": psnr(to_uint8(images.cpu()), to_uint8(recon.cpu()))}

    def save_checkpoint(self) -> None:
        generators = [self.generator.get_state()]
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, self.generator.get_state())
            generators = gathered
        if not self.dist.is_main:
            return
        state = {
            "stage": self.stage,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.training_state(),
            "generator": generators,
            "config": to_dict(self.cfg),
        }
        atomic_torch_save(state, self.out_dir / CHECKPOINT)

    def export(self) -> Path:
        """Write the EMA tokenizer to ``out_dir/model`` (config.json + model.safetensors)."""
        model = self.inference_model()
        return model.save_pretrained(self.out_dir / "model")

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, stop_at: Optional[int] = None) -> Path:
        """Train to ``total_steps`` (or only up to ``stop_at``, checkpointing there: for time-limited jobs
        that continue with ``--resume``); export the EMA tokenizer when the run is complete."""
        cfg, dist_info = self.cfg, self.dist
        if dist_info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            counts = {k: f"{v / 1e6:.2f}M" for k, v in self.model.parameter_counts().items()}
            print(f"[maetok] {self.stage}: {counts}; {len(self.train_set)} training images; device {self.device}")
        stream = batch_stream(self.train_set, cfg.train.batch_size, cfg.train.seed, self.step, dist_info, cfg.train.num_workers)
        log = RunLog(self.out_dir / "log.csv", self.total_steps, self.step, enabled=dist_info.is_main, desc=self.stage)
        window_start, window_images, window_steps, sums = time.perf_counter(), 0, 0, {}
        self.model.train()
        end = min(self.total_steps, stop_at) if stop_at is not None else self.total_steps
        while self.step < end:
            images, _labels = next(stream)
            logs = self.train_step(images)
            self.step += 1
            window_images += images.shape[0] * dist_info.world_size
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            log.advance()
            window_steps += 1
            last = self.step == self.total_steps
            do_eval = self.step % cfg.train.eval_every == 0 or last
            if self.step % cfg.train.log_every == 0 or do_eval:
                elapsed = time.perf_counter() - window_start
                row = mean_across_processes({k: v / window_steps for k, v in sums.items()}, self.device)
                row.update(step=self.step, img_per_s=window_images / max(elapsed, 1e-9))
                if do_eval and dist_info.is_main:
                    row.update(self.evaluate(self.step))
                log.log(row)
                window_start, window_images, window_steps, sums = time.perf_counter(), 0, 0, {}
            if self.step % cfg.train.ckpt_every == 0 or last or self.step == end:
                self.save_checkpoint()
        log.close()
        if hasattr(self.train_set, "log_skipped"):
            self.train_set.log_skipped()
        if dist_info.is_main and self.step == self.total_steps:
            path = self.export()
            print(f"[maetok] {self.stage} done: tokenizer saved to {path}")
        return self.out_dir / "model"

