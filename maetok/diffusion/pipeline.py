"""Building, saving, loading and sampling the diffusion models that generate MAETok latents.

A diffusion model directory holds ``config.json`` (architecture, latent normalisation, tokenizer path,
class names, sampling defaults) and ``model.safetensors`` (EMA weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maetok.config import ConfigError, DiffusionModelConfig, SamplingConfig, from_dict, to_dict
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_diffusion_model(cfg: DiffusionModelConfig, latent_shape: tuple[int, int], num_classes: int) -> nn.Module:
    """SiT or LightningDiT for latents ``(L, H) = latent_shape``; ``num_classes`` 0 (or ``cfg.conditional``
    False) builds an unconditional model."""
    from maetok.models.lightningdit import LightningDiTConfig, LightningDiT
    from maetok.models.sit import SiT, SiTConfig

    cfg.validate()
    overrides = {k: getattr(cfg, k) for k in ("width", "depth", "num_heads") if getattr(cfg, k) > 0}
    classes = num_classes if cfg.conditional else 0
    common = dict(
        latent_dim=latent_shape[1],
        num_latent_tokens=latent_shape[0],
        num_classes=classes,
        class_dropout_prob=cfg.class_dropout_prob if classes else 0.0,
        mlp_ratio=cfg.mlp_ratio,
        **overrides,
    )
    try:
        if cfg.arch == "sit":
            return SiT(SiTConfig.from_preset(cfg.preset, **common))
        return LightningDiT(LightningDiTConfig.from_preset(cfg.preset, **common))
    except ValueError as err:
        raise ConfigError(f"diffusion model: {err}") from None


class DiffusionPipeline:
    """A trained velocity model with what sampling needs: latent normalisation, the tokenizer directory,
    class names and the sampling defaults."""

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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.model.state_dict()
        config = {
            "model_type": "maetok-diffusion",
            "model": to_dict(self.model_cfg),
            "latent_shape": list(self.latent_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "latent_norm": self.normalizer.to_dict(),
            "sampling": to_dict(self.sampling),
            "tokenizer": self.tokenizer_dir,
        }
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, directory / CONFIG_NAME)
        return directory

    @classmethod
    def load(cls, directory: Union[str, Path], device: Optional[str] = None) -> "DiffusionPipeline":
        directory = Path(directory)
        if (directory / "model" / CONFIG_NAME).exists():
            directory = directory / "model"
        path = directory / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a diffusion model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "maetok-diffusion":
            raise ConfigError(f"{path}: model_type {raw.get('model_type')!r} is not a maetok diffusion model")
        model_cfg = from_dict(DiffusionModelConfig, raw["model"], where=f"{path}:model")
        latent_shape = tuple(raw["latent_shape"])
        model = build_diffusion_model(model_cfg, latent_shape, raw["num_classes"])
        state = load_file(str(directory / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(
            model.to(dev).eval(),
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
