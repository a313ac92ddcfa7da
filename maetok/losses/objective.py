"""The tokenizer's training objective (paper Eq. 6 and Eq. 8):

``L = w_rec * MSE + w_lpips * LPIPS + w_gan * lambda_adaptive * L_adv + sum_j w_j * L_mask^j (+ w_kl * KL)``

Each term is built only when its weight is non-zero, so the same class serves the AE/VAE/MAETok variants,
stage 1 and stage 2 (where the auxiliary targets are gone).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.config import LossConfig, TargetConfig
from maetok.errors import ModelFolderError
from maetok.losses.perceptual import ramp_weight
from maetok.global_batch import SampleRandom, global_weighted_mean
from maetok.models.tokenizer import TokenizerOutput
from maetok.targets.base import FeatureTarget


def masked_token_loss(prediction: Tensor, target: Tensor, mask: Optional[Tensor], kind: str) -> Tensor:
    """Mean per-token loss over the masked tokens of the global batch (all tokens when ``mask`` is None or
    masks nothing anywhere).

    prediction, target: ``(B, N, D)``; mask: ``(B, N)`` bool. ``kind``: ``mse`` (mean over D) or ``cosine``
    (``1 - cos``). Under several processes the count of masked tokens is the global one (processes mask
    different numbers of tokens), see :func:`~maetok.global_batch.global_weighted_mean`."""
    prediction = prediction.float()
    if kind == "mse":
        per_token = (prediction - target).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(prediction, target, dim=-1)
    else:
        raise ValueError(f"unknown target loss {kind!r}")
    if mask is None:
        return per_token.mean()
    return global_weighted_mean(per_token, mask, empty=per_token.mean())


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(dim=1).mean()


class TokenizerObjective(nn.Module):
    """Computes the generator-side loss and, when an adversarial term is configured, runs the
    discriminator's own update. ``perceptual`` maps images ``(B, C, H, W)`` in [-1, 1] pairs to per-sample
    distances ``(B,)``; ``adversarial`` exposes ``generator_loss``/``discriminator_step``/``state_dict``."""

    def __init__(
        self,
        loss: LossConfig,
        targets: dict[str, FeatureTarget],
        target_configs: list[TargetConfig],
        variant: str,
        perceptual: Optional[nn.Module] = None,
        adversarial: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.loss = loss
        self.targets = nn.ModuleDict(targets)
        self.target_configs = {t.name: t for t in target_configs if t.name in targets}
        self.variant = variant
        self.perceptual = perceptual
        self.adversarial = adversarial

    @property
    def has_discriminator(self) -> bool:
        return self.adversarial is not None

    def generator_loss(
        self,
        out: TokenizerOutput,
        images: Tensor,
        step: int,
        last_layer: Optional[Tensor] = None,
        captions: Optional[Tensor] = None,
        draws: Optional[SampleRandom] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss (scalar) and a dict of its terms (floats, for the log). ``captions``: ``(B, T)`` int64
        CLIP BPE ids of the batch's captions, needed when a ``text`` target is configured. ``draws``: the
        step's :class:`~maetok.global_batch.SampleRandom` over the batch (DiffAugment of the adversarial term,
        required once it is active)."""
        logs: dict[str, float] = {}
        recon = out.reconstruction.float()
        mse = F.mse_loss(recon, images.float())
        nll = self.loss.recon_weight * mse
        logs["mse"] = mse.item()
        if self.perceptual is not None and self.loss.perceptual_weight > 0:
            lpips = self.perceptual(recon, images.float()).mean()
            weight = ramp_weight(step, 0, self.loss.perceptual_warmup, self.loss.perceptual_weight)
            nll = nll + weight * lpips
            logs["lpips"] = lpips.item()
        total = nll
        for name, prediction in out.aux_predictions.items():
            cfg = self.target_configs[name]
            if getattr(self.targets[name], "loss", None) == "cross_entropy":  # the caption (text) target
                if captions is None:
                    raise ValueError(f"auxiliary target {name!r} needs the caption ids: generator_loss(captions=...)")
                term = self.targets[name].loss_from_logits(prediction, captions)
                total = total + cfg.weight * term
                logs[f"aux_{name}"] = term.item()
                continue
            with torch.no_grad():
                target = self.targets[name](images, out.grid).float()
            term = masked_token_loss(prediction, target, out.mask, cfg.loss)
            total = total + cfg.weight * term
            logs[f"aux_{name}"] = term.item()
        if out.posterior_logvar is not None and self.loss.kl_weight > 0:
            kl = kl_divergence(out.posterior_mean, out.posterior_logvar)
            total = total + self.loss.kl_weight * kl
            logs["kl"] = kl.item()
        if self.adversarial is not None and self.adversarial.generator_active(step):
            gan, gan_logs = self.adversarial.generator_loss(recon, nll, last_layer, step, draws=draws)
            total = total + gan
            logs.update(gan_logs)
        logs["loss"] = total.item()
        return total, logs

    def discriminator_step(
        self, real: Tensor, fake: Tensor, step: int, lr_factor: float = 1.0, draws: Optional[SampleRandom] = None
    ) -> dict[str, float]:
        """One discriminator update at learning rate ``gan_lr * lr_factor`` (no-op before it starts); ``draws``:
        the step's :class:`~maetok.global_batch.SampleRandom` over the batch (DiffAugment)."""
        if self.adversarial is None or not self.adversarial.active(step):
            return {}
        return self.adversarial.discriminator_step(real, fake.detach(), step, lr_factor=lr_factor, draws=draws)

    def training_state(self) -> dict:
        """What must be checkpointed beside the tokenizer (the discriminator and its optimizer)."""
        return {"adversarial": self.adversarial.state_dict()} if self.adversarial is not None else {}

    def load_training_state(self, state: dict) -> None:
        if self.adversarial is not None:
            if "adversarial" not in state:
                raise ModelFolderError("the checkpoint has no discriminator state, but this run trains one")
            self.adversarial.load_state_dict(state["adversarial"])
