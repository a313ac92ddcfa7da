"""Building, saving, loading and sampling the diffusion models that generate MAETok latents.

A diffusion model directory holds ``config.json`` (architecture, latent normalisation, tokenizer path,
class names, sampling defaults) and ``model.safetensors`` (EMA weights); its reader and writer live with the
models (:func:`maetok.models.sit.read_diffusion_folder`, :func:`~maetok.models.sit.save_diffusion_folder`), which
also read the authors' released SiT folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from maetok.config import ConfigError, DiffusionModelConfig, SamplingConfig, from_dict, to_dict
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.samplers import euler_maruyama_sample, euler_sample, make_model_fn
from maetok.models.sit import build_velocity_model, load_velocity_model, save_diffusion_folder

STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # SamplingConfig.precision


def build_diffusion_model(cfg: DiffusionModelConfig, latent_shape: tuple[int, int], num_classes: int) -> nn.Module:
    """SiT or LightningDiT for latents ``(L, C) = latent_shape`` (the size from ``cfg.preset``'s row of
    :data:`maetok.config.DIFFUSION_SIZES`, overridden by ``cfg.width/depth/num_heads`` > 0); ``num_classes`` 0
    (or ``cfg.conditional`` False) builds an unconditional model. The model maps ``(B, L, C)`` -> ``(B, L, C)``."""
    architecture = cfg.architecture(latent_shape, num_classes)  # validates cfg
    try:
        return build_velocity_model(architecture)
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
        state = state_dict if state_dict is not None else self.model.state_dict()
        return save_diffusion_folder(directory, self.model_cfg, self.latent_shape, self.num_classes, state,
                                     class_names=self.class_names, latent_norm=self.normalizer.to_dict(),
                                     sampling=to_dict(self.sampling), tokenizer=self.tokenizer_dir)

    @classmethod
    def load(cls, directory: Union[str, Path], device: Optional[str] = None) -> "LatentGenerator":
        """A diffusion model folder written by :meth:`save`, the run directory holding it as ``model/``, the
        authors' released SiT folder, or a hub id of either. The authors' SiT comes with their sampling
        conventions (:data:`maetok.config.AUTHORS_SAMPLING`) and no tokenizer: its latent normalisation is the
        tokenizer's (:meth:`normalizer_for`)."""
        model, folder = load_velocity_model(directory, device)
        extras = folder.extras
        where = f"{folder.directory / 'config.json'}"
        return cls(
            model,
            folder.model_cfg,
            LatentNormalizer.from_dict(extras["latent_norm"]),
            folder.latent_shape,
            folder.num_classes,
            list(extras.get("class_names") or []),
            from_dict(SamplingConfig, extras["sampling"], where=f"{where}:sampling"),
            extras.get("tokenizer"),
        )

    def normalizer_for(
        self,
        sampling: Optional[SamplingConfig] = None,
        tokenizer: Any = None,
        scalars: Optional[Sequence[float]] = None,
    ) -> LatentNormalizer:
        """The latent normalisation to undo after sampling: ``scalars`` ``(mean, std)`` when given; else, with
        ``sampling.latent_norm == "tokenizer"``, the scalar latent mean / std the tokenizer carries
        (:func:`tokenizer_latent_scalars`); else the model's own statistics."""
        s = sampling or self.sampling
        if scalars is not None:
            mean, std = (float(v) for v in scalars)
        elif s.latent_norm == "tokenizer":
            if tokenizer is None:
                raise ValueError("sampling.latent_norm='tokenizer' needs the tokenizer")
            mean, std = tokenizer_latent_scalars(tokenizer)
        else:
            return self.normalizer
        if not std > 0:
            raise ValueError(f"the latent std must be positive, got {std}")
        return LatentNormalizer.from_dict({"mode": "scalar", "mean": mean, "std": std})

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
        normalizer: Optional[LatentNormalizer] = None,
    ) -> Tensor:
        """Generate ``num`` latents ``(num, L, H)`` (denormalised by ``normalizer``, default the model's own:
        ready for ``tokenizer.decode``). ``labels`` ``(num,)`` int64 or None (unconditional; a conditional model
        then uses its null class). The noise comes from ``generator`` (on its device), the sampler and its
        conventions from ``sampling`` (default the model's)."""
        s = sampling or self.sampling
        s.validate()
        if labels is not None and self.num_classes and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        cfg_scale = s.cfg_scale if (labels is not None and self.num_classes) else 1.0
        if labels is not None and not self.num_classes:
            labels = None
        noise_device = generator.device if generator is not None else None
        noise = torch.randn((num, *self.latent_shape), generator=generator, device=noise_device).to(self.device)
        model_fn = make_model_fn(self.model, labels, cfg_scale, (s.guidance_low, s.guidance_high))
        n_steps = steps or s.steps
        state_dtype = STATE_DTYPES[s.precision]
        if s.sampler == "euler":
            x0 = euler_sample(model_fn, noise, num_steps=n_steps, progress=progress, state_dtype=state_dtype)
        else:
            x0 = euler_maruyama_sample(model_fn, noise, num_steps=n_steps, t_end=s.t_end,
                                       diffusion_coef=s.diffusion_form, generator=generator, last_step=s.last_step,
                                       cfg_on=s.cfg_on, state_dtype=state_dtype, progress=progress)
        return (normalizer or self.normalizer).denormalize(x0.float())


# the names under which a tokenizer (the model, its config, or a config.json dict) carries scalar latent statistics,
# in the order they are tried: ours (a released tokenizer's latent_mean / latent_std), then the authors' config keys
# (their ModelArgs: vq_mean / vq_std, used as decode(x * vq_std + vq_mean))
LATENT_SCALAR_NAMES = (("latent_mean", "latent_std"), ("vq_mean", "vq_std"))


def tokenizer_latent_scalars(tokenizer: Any) -> tuple[float, float]:
    """``(mean, std)``: the scalar latent statistics that ``tokenizer`` (a tokenizer model, its ``config``, or a
    mapping) carries under one of :data:`LATENT_SCALAR_NAMES`. ``ValueError`` when it carries none (our own
    tokenizers: their statistics are per channel, measured by ``cache-latents``)."""
    for holder in (tokenizer, getattr(tokenizer, "config", None)):
        if holder is None:
            continue
        for mean_name, std_name in LATENT_SCALAR_NAMES:
            if isinstance(holder, Mapping):
                mean, std = holder.get(mean_name), holder.get(std_name)
            else:
                mean, std = getattr(holder, mean_name, None), getattr(holder, std_name, None)
            if mean is not None and std is not None:
                return float(mean), float(std)
    names = " / ".join(f"{a}, {b}" for a, b in LATENT_SCALAR_NAMES)
    raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) carries no scalar latent mean / std ({names}): "
                     "use the model's latent statistics (--latent-norm model) or give them (--latent-scalars MEAN STD)")
