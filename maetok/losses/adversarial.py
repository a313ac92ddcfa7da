"""Adversarial part of the tokenizer objective (paper Eq. 6, Table 7): hinge GAN loss with a frozen-backbone
discriminator, adaptive weight, LeCAM regularisation, differentiable augmentation and a start-step gate.

Typical use in a training step (``step`` = global optimisation step, ``draws`` = the step's
:class:`~maetok.global_batch.SampleRandom` over the batch, for the DiffAugment parameters)::

    adv = AdversarialLoss(build_discriminator("dinov2"), weight=0.4, start_step=30_000)
    adv.to(device)
    nll = pixel_mse + 1.0 * lpips                                  # the reconstruction loss
    g_adv, logs = adv.generator_loss(recon, nll, decoder_last_weight, step, draws=draws)
    (nll + g_adv + mask_loss).backward(); tokenizer_optimizer.step()
    logs |= adv.discriminator_step(images, recon, step, draws=draws)  # own zero_grad/backward/step
    checkpoint["adversarial"] = adv.state_dict()                   # discriminator + optimizer + LeCAM anchors
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.errors import ModelFolderError
from maetok.global_batch import SampleRandom, all_finite_everywhere, average_gradients, global_mean, require_draws

# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (scalar).

    logits: any shape, e.g. ``(B, K)``; the 0.5 factor is the VQGAN/taming convention.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Hinge generator loss ``-mean(fake logits)`` (scalar)."""
    return -logits_fake.mean()


def lecam_regularization(logits_real: Tensor, logits_fake: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCAM term (Tseng et al. 2021), unweighted:
    ``mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``; anchors are scalars (no gradient)."""
    ema_real, ema_fake = ema_real.detach(), ema_fake.detach()
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCAMRegularizer(nn.Module):
    """LeCAM regulariser with EMA anchors of the mean real / fake logits, kept as buffers (saved for resume).

    forward(logits_real, logits_fake): first updates the anchors with the batch means
    (``ema = decay * ema + (1 - decay) * mean``; the first update copies the mean, as in Tseng et al.'s code
    where the decay is 0 before the regulariser starts), then returns ``weight * lecam_regularization``.
    """

    def __init__(self, weight: float = 1e-3, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM EMA decay must be in [0, 1), got {decay}")
        self.weight = float(weight)
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        means = global_mean(torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()]))
        real_mean, fake_mean = means[0], means[1]  # the global batch's means under several processes
        decay = self.decay if int(self.num_updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1.0 - decay) * real_mean)
        self.ema_fake.mul_(decay).add_((1.0 - decay) * fake_mean)
        self.num_updates.add_(1)

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        self.update(logits_real, logits_fake)
        regularization = lecam_regularization(logits_real.float(), logits_fake.float(), self.ema_real, self.ema_fake)
        return self.weight * regularization


def adaptive_weight(
    nll_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, eps: float = 1e-4, max_weight: float = 1e4
) -> Tensor:
    """``||d nll / d last_layer|| / (||d adv / d last_layer|| + eps)`` clamped to ``[0, max_weight]``, detached.

    ``last_layer``: the weight of the generator's (decoder's) last layer, a leaf tensor that both losses
    depend on. Returns a float32 scalar. Without autograd (``torch.no_grad`` / losses without graph) it
    returns 0, as in VQGAN, so evaluation passes can call it. Under several processes both gradients are
    averaged over the processes first (those of the global batch's losses), so every process gets the same weight.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and adv_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    try:
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    except RuntimeError as error:
        raise RuntimeError(
            "adaptive adversarial weight: could not differentiate the losses w.r.t. last_layer "
            f"(shape {tuple(last_layer.shape)}); pass the weight of the decoder's final layer that produced "
            f"the reconstruction ({error})"
        ) from None
    # under several processes the gradients of the global batch's losses: the mean of the processes' gradients
    both = global_mean(torch.cat([nll_grad.float().flatten(), adv_grad.float().flatten()]))
    nll_grad, adv_grad = both[: nll_grad.numel()], both[nll_grad.numel() :]
    weight = nll_grad.norm() / (adv_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------------
# Differentiable augmentation (Zhao et al. 2020)
# ---------------------------------------------------------------------------------------------------------


class DiffAugment:
    """Differentiable augmentation: ``color`` (brightness, saturation, contrast), ``translation`` (shift up to
    ``translation_ratio`` of the size, zero fill) and ``cutout`` (a zeroed square of ``cutout_ratio`` of the
    size). Images ``(B, C, H, W)`` in [-1, 1].

    ``augment(a, b, ..., draws=d)`` draws one set of random parameters per sample and applies it to every
    tensor passed (all of the same shape), so a real image and its reconstruction get the same augmentation.
    ``draws``: the batch's :class:`~maetok.global_batch.SampleRandom` (required unless the policy is empty);
    each sample's parameters come from its own streams, named ``brightness`` ... ``cutout_left``, drawn on the
    CPU: reproducible, device independent.
    """

    POLICIES = ("color", "translation", "cutout")

    def __init__(self, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5):
        self.policy = [p.strip() for p in policy.split(",") if p.strip()] if policy else []
        unknown = [p for p in self.policy if p not in self.POLICIES]
        if unknown:
            raise ValueError(f"unknown DiffAugment policies {unknown}; known: {list(self.POLICIES)}")
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def __call__(self, *images: Tensor, draws: Optional[SampleRandom] = None) -> Union[Tensor, tuple[Tensor, ...]]:
        if not images:
            raise ValueError("DiffAugment needs at least one image tensor")
        shape = images[0].shape
        if any(x.shape != shape for x in images) or len(shape) != 4:
            shapes = [tuple(x.shape) for x in images]
            raise ValueError(f"DiffAugment inputs must share one (B, C, H, W) shape, got {shapes}")
        if self.policy:
            draws = require_draws(draws, shape[0], "DiffAugment")
        out = list(images)
        for name in self.policy:
            params = getattr(self, f"_sample_{name}")(shape, draws, images[0].device)
            out = [getattr(self, f"_apply_{name}")(x, params) for x in out]
        return out[0] if len(out) == 1 else tuple(out)

    @staticmethod
    def _sample_color(shape, draws: SampleRandom, device):
        b = shape[0]
        return [draws.uniform(name).to(device).view(b, 1, 1, 1) for name in ("brightness", "saturation", "contrast")]

    @staticmethod
    def _apply_color(x: Tensor, params) -> Tensor:
        brightness, saturation, contrast = (p.to(x.dtype) for p in params)
        x = x + (brightness - 0.5)
        channel_mean = x.mean(dim=1, keepdim=True)
        x = (x - channel_mean) * (saturation * 2.0) + channel_mean
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - image_mean) * (contrast + 0.5) + image_mean

    def _sample_translation(self, shape, draws: SampleRandom, device):
        _, _, h, w = shape
        max_h, max_w = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
        shift_h = draws.integers("shift_h", -max_h, max_h + 1)
        shift_w = draws.integers("shift_w", -max_w, max_w + 1)
        return max_h, max_w, shift_h.to(device), shift_w.to(device)

    @staticmethod
    def _apply_translation(x: Tensor, params) -> Tensor:
        max_h, max_w, shift_h, shift_w = params
        b, _, h, w = x.shape
        padded = F.pad(x, (max_w, max_w, max_h, max_h))
        # output pixel (i, j) reads input pixel (i - shift_h, j - shift_w), zeros outside
        rows = torch.arange(h, device=x.device)[None, :] + max_h - shift_h[:, None]  # (B, H)
        cols = torch.arange(w, device=x.device)[None, :] + max_w - shift_w[:, None]  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _sample_cutout(self, shape, draws: SampleRandom, device):
        _, _, h, w = shape
        size_h, size_w = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
        top = draws.integers("cutout_top", -(size_h // 2), h - size_h // 2 + 1)
        left = draws.integers("cutout_left", -(size_w // 2), w - size_w // 2 + 1)
        rows = torch.arange(h)[None, :]
        cols = torch.arange(w)[None, :]
        inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)
        inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)
        keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
        return keep[:, None].to(device)

    @staticmethod
    def _apply_cutout(x: Tensor, keep: Tensor) -> Tensor:
        return x * keep.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The wrapper the trainer uses
# ---------------------------------------------------------------------------------------------------------


def _namespace(draws: Optional[SampleRandom], name: str) -> Optional[SampleRandom]:
    """The draws' child namespace ``name`` (None stays None: :class:`DiffAugment` says what is missing)."""
    return draws.child(name) if draws is not None else None


@contextlib.contextmanager
def _parameters_frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` so a forward builds no graph into these parameters."""
    previous = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, previous):
            p.requires_grad_(flag)


AutocastArg = Optional[Union[ContextManager[Any], Callable[[], ContextManager[Any]]]]


def _enter_autocast(autocast: AutocastArg) -> ContextManager[Any]:
    if autocast is None:
        return contextlib.nullcontext()
    if hasattr(autocast, "__enter__"):
        return autocast  # type: ignore[return-value]
    return autocast()  # a factory such as lambda: torch.autocast("cuda", dtype=torch.bfloat16)


class AdversarialLoss(nn.Module):
    """Hinge GAN loss with its discriminator, the discriminator's AdamW optimizer and the LeCAM anchors.

    Args:
        discriminator: a module mapping images ``(B, C, H, W)`` in [-1, 1] to logits ``(B, K)`` and exposing
            ``trainable_parameters()`` (e.g. :class:`maetok.losses.discriminator.ProjectedDiscriminator`).
        weight: adversarial loss weight (paper 0.4), multiplied by the adaptive weight.
        start_step: the discriminator trains from this step on (paper 30K).
        generator_start_step: the adversarial loss reaches the generator from this step on (default
            ``start_step``; later when a new discriminator must first warm up against a trained decoder).
        adaptive: use :func:`adaptive_weight` (paper: yes), clamped to ``[0, max_adaptive_weight]``.
        lecam_weight / lecam_decay: LeCAM regularisation (paper 0.001; EMA decay 0.999).
        diffaug: DiffAugment policy, "" to disable.
        lr / betas / weight_decay: discriminator AdamW (defaults = the tokenizer's: 1e-4, (0.9, 0.95), 1e-4);
            ``lr`` is the peak: :meth:`discriminator_step` scales it by the generator's schedule factor.
        max_grad_norm: optional gradient clipping of the discriminator.

    It is an ``nn.Module`` (``.to(device)`` moves the discriminator and the anchors; it can be a submodule of
    the training objective). Its ``state_dict`` holds the discriminator heads (the frozen backbone is left
    out), the LeCAM anchors and, under ``_extra_state``, the discriminator optimizer, so ``load_state_dict``
    resumes exactly (the augmentation draws are keyed by the step's ``draws``: no generator state). The
    optimizer state is created on the parameters' device and moved onto it when loaded. ``optimizer`` is
    public so a scheduler can drive its learning rate.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        *,
        weight: float = 0.4,
        start_step: int = 30_000,
        generator_start_step: Optional[int] = None,
        adaptive: bool = True,
        max_adaptive_weight: float = 1e4,
        lecam_weight: float = 1e-3,
        lecam_decay: float = 0.999,
        diffaug: str = "color,translation,cutout",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 1e-4,
        max_grad_norm: Optional[float] = None,
    ):
        super().__init__()
        self.discriminator = discriminator
        self.lecam = LeCAMRegularizer(lecam_weight, lecam_decay)
        self.weight = float(weight)
        self.start_step = int(start_step)
        self.generator_start_step = self.start_step if generator_start_step is None else int(generator_start_step)
        self.lr = float(lr)
        self.adaptive = adaptive
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.augment = DiffAugment(diffaug)
        self.max_grad_norm = max_grad_norm
        trainable = self.trainable_parameters()
        if not trainable:
            raise ValueError("the discriminator has no trainable parameters")
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    # -- helpers -------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The discriminator parameters its optimizer updates (never the frozen backbone)."""
        if hasattr(self.discriminator, "trainable_parameters"):
            return list(self.discriminator.trainable_parameters())
        return [p for p in self.discriminator.parameters() if p.requires_grad]

    def active(self, step: int) -> bool:
        """Whether the discriminator trains at ``step`` (``step >= start_step``)."""
        return step >= self.start_step

    def generator_active(self, step: int) -> bool:
        """Whether the generator gets the adversarial loss at ``step`` (``step >= generator_start_step``)."""
        return step >= max(self.start_step, self.generator_start_step)

    # -- checkpointing (through nn.Module.state_dict / load_state_dict) -----------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """The discriminator optimizer; the ``augment_rng`` of older checkpoints (a generator state nothing
        draws from now) is ignored."""
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ModelFolderError("adversarial state lacks the discriminator optimizer ('_extra_state.optimizer')")
        self.optimizer.load_state_dict(state["optimizer"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("call AdversarialLoss.generator_loss(...) or .discriminator_step(...)")

    # -- generator side ------------------------------------------------------------------------------------

    def generator_loss(
        self,
        fake: Tensor,
        nll_loss: Tensor,
        last_layer: Optional[Tensor],
        step: int,
        draws: Optional[SampleRandom] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted generator loss ``weight * lambda * (-mean D(aug(fake)))`` and float logs.

        fake: reconstructions ``(B, C, H, W)`` in [-1, 1] (with graph). nll_loss: the scalar reconstruction
        loss (pixel + perceptual) the adaptive weight balances. last_layer: the decoder's last weight (needed
        when ``adaptive``). Before ``start_step`` returns a zero scalar without running the discriminator.
        The discriminator runs in eval mode here and its parameters get no gradient from this loss, so the
        generator step changes nothing in the discriminator (weights, spectral-norm vectors, optimizer).
        ``draws``: the step's :class:`~maetok.global_batch.SampleRandom` over the batch (the DiffAugment parameters,
        namespace ``diffaug/generator``); required unless the DiffAugment policy is empty.
        """
        if not self.generator_active(step):
            zero = torch.zeros((), device=fake.device, dtype=torch.float32)
            return zero, {"adv/g_loss": 0.0, "adv/weight": 0.0}
        was_training = self.discriminator.training
        self.discriminator.eval()  # no spectral-norm power iteration: the generator step leaves D untouched
        try:
            with _parameters_frozen(self.trainable_parameters()):
                augmented = self.augment(fake, draws=_namespace(draws, "diffaug/generator"))
                logits_fake = self.discriminator(augmented)
        finally:
            self.discriminator.train(was_training)
        g_loss = hinge_g_loss(logits_fake.float())
        if self.adaptive:
            if last_layer is None:
                raise ValueError("adaptive adversarial weight needs last_layer (the decoder's final weight)")
            lam = adaptive_weight(nll_loss, g_loss, last_layer, max_weight=self.max_adaptive_weight)
        else:
            lam = torch.ones((), device=g_loss.device)
        total = self.weight * lam * g_loss
        logs = {"adv/g_loss": float(g_loss.detach()), "adv/adaptive_weight": float(lam),
                "adv/weight": self.weight * float(lam)}
        return total, logs

    # -- discriminator side --------------------------------------------------------------------------------

    def discriminator_step(
        self,
        real: Tensor,
        fake: Tensor,
        step: int,
        autocast: AutocastArg = None,
        lr_factor: float = 1.0,
        draws: Optional[SampleRandom] = None,
    ) -> dict[str, float]:
        """One discriminator update (zero_grad, backward, optimizer step); returns float logs.

        real / fake: ``(B, C, H, W)`` in [-1, 1]; both are detached, get the same DiffAugment parameters and go
        through the discriminator in one batch. autocast: an optional context manager (or a factory returning
        one), e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``; losses are computed in float32 and no
        GradScaler is used. ``lr_factor``: the generator's schedule factor (warmup, cosine) at ``step``; the
        learning rate is ``lr * lr_factor``. Before ``start_step`` nothing happens and ``{}`` is returned.
        ``draws``: as in :meth:`generator_loss` (namespace ``diffaug/discriminator``). Under several processes
        the gradients are averaged over them before the step (and the LeCAM anchors follow the global batch),
        so every process keeps the same discriminator, as under DDP.
        """
        if not self.active(step):
            return {}
        if real.shape != fake.shape:
            raise ValueError(f"real and fake batches differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
        draws = _namespace(draws, "diffaug/discriminator")
        real_aug, fake_aug = self.augment(real.detach(), fake.detach(), draws=draws)
        self.discriminator.train()
        with _enter_autocast(autocast):
            logits = self.discriminator(torch.cat([real_aug, fake_aug], dim=0))
        logits_real, logits_fake = logits.float().chunk(2, dim=0)
        lr = self.lr * lr_factor
        if not all_finite_everywhere(logits):  # NaN / inf logits: no LeCAM anchor update, no step
            return {"adv/lr": lr, "adv/skipped": 1.0}
        d_loss = hinge_d_loss(logits_real, logits_fake)
        anchors = {k: v.clone() for k, v in self.lecam.state_dict().items()}  # restored if the step is skipped
        lecam = self.lecam(logits_real, logits_fake)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        (d_loss + lecam).backward()
        average_gradients(self.trainable_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.max_grad_norm or float("inf"))
        if not all_finite_everywhere(grad_norm):  # a non-finite gradient: the update (and the anchors') is dropped
            self.optimizer.zero_grad(set_to_none=True)
            self.lecam.load_state_dict(anchors)
            return {"adv/lr": lr, "adv/skipped": 1.0}
        if self.max_grad_norm is None:
            grad_norm = None
        self.optimizer.step()
        logs = {
            "adv/skipped": 0.0,
            "adv/d_loss": float(d_loss.detach()),
            "adv/lecam": float(lecam.detach()),
            "adv/logits_real": float(logits_real.detach().mean()),
            "adv/logits_fake": float(logits_fake.detach().mean()),
            "adv/lr": lr,
        }
        if grad_norm is not None:
            logs["adv/d_grad_norm"] = float(grad_norm)
        return logs


# ---------------------------------------------------------------------------------------------------------
# Construction from the trainer's config
# ---------------------------------------------------------------------------------------------------------

_DINOV2_DISCRIMINATOR_MODELS = {
    "s": "facebook/dinov2-small",
    "b": "facebook/dinov2-base",
    "l": "facebook/dinov2-large",
    "g": "facebook/dinov2-giant",
}


def build_adversarial_loss(
    loss_cfg: Any, optim_cfg: Any = None, *, in_channels: int = 3, image_size: int = 256, **overrides: Any
) -> AdversarialLoss:
    """An :class:`AdversarialLoss` from the trainer's loss / optimizer configs (read by attribute name).

    loss_cfg: ``gan_weight`` (0.4), ``gan_start`` (30000), ``gan_backbone`` (``"dinov2-s"`` (paper),
    ``"dinov2-b"/"-l"/"-g"``, ``"vgg16"`` (packaged, offline) or ``"auto"``: DINOv2-S when its weights are
    found locally, else VGG16 with a warning), ``gan_lr`` (1e-4), ``lecam_weight`` (1e-3) and optionally
    ``gan_backbone_weights`` (a local folder / hub id for DINOv2, or the LPIPS/VGG16 file).
    optim_cfg: ``betas`` and ``weight_decay`` of the discriminator AdamW (defaults (0.9, 0.95), 1e-4).
    ``overrides``: any :class:`AdversarialLoss` keyword (e.g. ``diffaug``).
    in_channels: 1 or 3 (grayscale images are repeated to RGB by the backbone); image_size: for reference
    (DINOv2 sees 224 px inputs whatever the image size; VGG16 sees the image at its own size, >= 16 px).
    """
    from maetok.assets import AssetError
    from maetok.losses.discriminator import build_discriminator

    if in_channels not in (1, 3):
        raise ValueError(f"the discriminator takes 1- or 3-channel images, got in_channels={in_channels}")
    if image_size < 16:
        raise ValueError(f"the discriminator needs images of at least 16 px, got image_size={image_size}")
    backbone = str(getattr(loss_cfg, "gan_backbone", "dinov2-s")).lower()
    weights = getattr(loss_cfg, "gan_backbone_weights", None)

    def dinov2(size: str):
        if size not in _DINOV2_DISCRIMINATOR_MODELS:
            raise ValueError(f"unknown DINOv2 discriminator size {size!r}; expected one of "
                             f"{['dinov2-' + k for k in _DINOV2_DISCRIMINATOR_MODELS]}")
        return build_discriminator("dinov2", model_id=_DINOV2_DISCRIMINATOR_MODELS[size], weights=weights)

    if backbone in ("dinov2", "dinov2-s", "dinov2-b", "dinov2-l", "dinov2-g"):
        discriminator = dinov2(backbone.split("-")[1] if "-" in backbone else "s")
    elif backbone == "vgg16":
        discriminator = build_discriminator("vgg16", weights=weights)
    elif backbone == "auto":
        try:
            discriminator = dinov2("s")
        except (AssetError, ImportError) as error:
            import warnings

            warnings.warn(f"DINOv2-S discriminator unavailable ({str(error).splitlines()[0]}); "
                          "using the packaged VGG16 backbone instead", stacklevel=2)
            discriminator = build_discriminator("vgg16")
    else:
        raise ValueError(f"unknown gan_backbone {backbone!r}; expected dinov2-s/-b/-l/-g, vgg16 or auto")
    settings: dict[str, Any] = dict(
        weight=float(getattr(loss_cfg, "gan_weight", 0.4)),
        start_step=int(getattr(loss_cfg, "gan_start", 30_000)),
        lecam_weight=float(getattr(loss_cfg, "lecam_weight", 1e-3)),
        lr=float(getattr(loss_cfg, "gan_lr", 1e-4)),
    )
    if optim_cfg is not None:
        settings["betas"] = tuple(getattr(optim_cfg, "betas", (0.9, 0.95)))
        settings["weight_decay"] = float(getattr(optim_cfg, "weight_decay", 1e-4))
    settings.update(overrides)
    return AdversarialLoss(discriminator, **settings)
