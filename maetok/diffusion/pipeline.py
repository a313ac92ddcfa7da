"""Building, saving, loading and sampling the diffusion models that generate MAETok latents.

A diffusion model directory holds ``config.json`` (architecture, latent normalisation, tokenizer path,
class names, sampling defaults) and ``model.safetensors`` (EMA weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from maetok.config import ConfigError, DiffusionModelConfig, SamplingConfig, from_dict, to_dict
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn
from maetok.runs import MODEL_CONFIG, load_model_weights, read_model_config, resolve_device, save_model_folder

MODEL_TYPE = "maetok-diffusion"  # config.json's model_type


def build_diffusion_model(cfg: DiffusionModelConfig, latent_shape: tuple[int, int], num_classes: int) -> nn.Module:
    """SiT or LightningDiT for latents ``(L, C) = latent_shape`` (the size from ``cfg.preset``'s row of
    :data:`maetok.config.DIFFUSION_SIZES`, overridden by ``cfg.width/depth/num_heads`` > 0); ``num_classes`` 0
    (or ``cfg.conditional`` False) builds an unconditional model. The model maps ``(B, L, C)`` -> ``(B, L, C)``."""
    from maetok.models.lightningdit import LightningDiT
    from maetok.models.sit import SiT

    architecture = cfg.architecture(latent_shape, num_classes)  # validates cfg
    model_class = {"sit": SiT, "lightningdit": LightningDiT}[cfg.arch]
    try:
        return model_class(architecture)
    except ValueError as err:
        raise ConfigError(f"diffusion model: {err}") from None


class LatentGenerator:
    """A trained velocity model with what sampling needs: latent normalisation, the tokenizer directory,
    class names and the sampling defaults. (Not a diffusers ``DiffusionPipeline``: that wrapper lives in
    :mod:`maetok.integrations.diffusers`.)"""

    def __init__(
        self,
        model: nn.Module,
        model_cfg: DiffusionModelConfig,
        normalizer: LatentNormalizer,
        latent_shape: tuple[int, int],
        num_classes: int,
        class_names: list[str],
        sampling: SamplingConfig,
        tokenizer_dir: Optional[str],
    ):
        self.model = model
        self.model_cfg = model_cfg
        self.normalizer = normalizer
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes if model_cfg.conditional else 0
        self.class_names = class_names
        self.sampling = sampling
        self.tokenizer_dir = tokenizer_dir

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, directory: Union[str, Path], state_dict: Optional[dict[str, Tensor]] = None) -> Path:
        """Write the model folder (``state_dict``, default the model's, e.g. the EMA weights), atomically."""
        config = {
            "model": to_dict(self.model_cfg),
            "latent_shape": list(self.latent_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "latent_norm": self.normalizer.to_dict(),
            "sampling": to_dict(self.sampling),
            "tokenizer": self.tokenizer_dir,
        }
        state = state_dict if state_dict is not None else self.model.state_dict()
        return save_model_folder(directory, MODEL_TYPE, config, state)

    @classmethod
    def load(cls, directory: Union[str, Path], device: Optional[str] = None) -> "LatentGenerator":
        """A diffusion model directory written by :meth:`save`, or the run directory holding it as ``model/``."""
        directory, raw = read_model_config(directory, MODEL_TYPE, "diffusion model")
        path = directory / MODEL_CONFIG
        model_cfg = from_dict(DiffusionModelConfig, raw["model"], where=f"{path}:model")
        latent_shape = tuple(raw["latent_shape"])
        model = build_diffusion_model(model_cfg, latent_shape, raw["num_classes"])
        load_model_weights(model, directory)
        return cls(
            model.to(resolve_device(device)).eval(),
            model_cfg,
            LatentNormalizer.from_dict(raw["latent_norm"]),
            latent_shape,
            raw["num_classes"],
            raw.get("class_names", []),
            from_dict(SamplingConfig, raw["sampling"], where=f"{path}:sampling"),
            raw.get("tokenizer"),
        )

    def balanced_labels(self, num: int) -> Optional[Tensor]:
        """``num`` labels cycling over all classes (None for an unconditional model)."""
        if not self.num_classes:
            return None
        return torch.arange(num) % self.num_classes

    @torch.no_grad()
    def sample_latents(
        self,
        labels: Optional[Tensor],
        num: int,
        sampling: Optional[SamplingConfig] = None,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
        progress: bool = False,
    ) -> Tensor:
        """Generate ``num`` latents ``(num, L, H)`` (denormalised: ready for ``tokenizer.decode``).
        ``labels`` ``(num,)`` int64 or None (unconditional; a conditional model then uses its null class)."""
        s = sampling or self.sampling
        s.validate()
        if labels is not None and self.num_classes and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        cfg_scale = s.cfg_scale if (labels is not None and self.num_classes) else 1.0
        if labels is not None and not self.num_classes:
            labels = None
        noise = torch.randn((num, *self.latent_shape), generator=generator).to(self.device)
        model_fn = make_model_fn(self.model, labels, cfg_scale, (s.guidance_low, s.guidance_high))
        n_steps = steps or s.steps
        if s.sampler == "euler":
            x0 = euler_sample(model_fn, noise, num_steps=n_steps, progress=progress)
        else:
            x0 = euler_maruyama_sample(model_fn, noise, num_steps=n_steps, generator=generator, progress=progress)
        return self.normalizer.denormalize(x0.float())
