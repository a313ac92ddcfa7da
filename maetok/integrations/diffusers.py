"""maetok models as diffusers components (the ``maetok[diffusers]`` extra): save, load and call them with diffusers.

* :class:`MAETokAutoencoder`: a tokenizer as a diffusers ``ModelMixin`` + ``ConfigMixin``. ``encode(x)`` returns
  ``EncoderOutput(latent=...)`` (``AutoencoderKLOutput(latent_dist=...)`` for a VAE tokenizer), ``decode(z)``
  ``DecoderOutput(sample=...)``; images ``(B, C, H, W)`` in [-1, 1], latents ``(B, L, H)``.
* :class:`MAETokTransformer`: a SiT / LightningDiT with what undoing its latent normalisation needs.
* :class:`MAETokSampler`: the sampler settings (:class:`maetok.config.SamplingConfig`) as a diffusers scheduler
  config (``scheduler/scheduler_config.json``); sampling itself runs through
  :class:`maetok.diffusion.generator.LatentGenerator`, the one place that samples.
* :class:`MAETokSiTPipeline`: the three bundled as a ``DiffusionPipeline``, callable with ``class_labels`` (ids or
  class names), ``num_images_per_prompt``, ``num_inference_steps``, ``guidance_scale``, ``generator`` (one or one per
  image), ``output_type``; returns ``ImagePipelineOutput``; shows a progress bar (``set_progress_bar_config``).

Build from maetok folders or hub ids (ours or the authors' released weights)::

    pipe = MAETokSiTPipeline.from_maetok("MAETok/sit-xl_maetok-b-128", tokenizer="MAETok/maetok-b-128")
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=1.9,
                  generator=torch.Generator().manual_seed(0)).images
    pipe.save_pretrained("out/pipe");  MAETokSiTPipeline.from_pretrained("out/pipe")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

try:
    from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution, EncoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError:  # one line, naming the extra
    raise ImportError("maetok.integrations.diffusers needs diffusers: pip install 'maetok[diffusers]'") from None

from maetok.config import SamplingConfig, to_dict
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.generator import LatentGenerator
from maetok.encode import load_tokenizer
from maetok.model_folders import build_tokenizer, diffusion_model_config
from maetok.models.sit import build_diffusion_model
from maetok.models.tokenizer import MAETok

__all__ = ["MAETokAutoencoder", "MAETokTransformer", "MAETokSampler", "MAETokSiTPipeline"]

PathLike = Union[str, Path]


def _tokenizer_config(tokenizer: MAETok) -> dict:
    """What the tokenizer's ``config.json`` holds (a released tokenizer adds its architecture entry)."""
    return tokenizer.config_dict()


def _load_strictly(load: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """diffusers' ``ModelMixin.from_pretrained`` (``load``), strict as every maetok loader: missing, unexpected or
    mis-shaped weights (which diffusers would only warn about and initialise at random) and non-finite weights raise
    one line naming the folder."""
    from maetok.runs import check_finite_tensors

    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(*args, **_eager(kwargs), output_loading_info=True)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path", "the folder")
    problems = [f"{len(info.get(kind) or [])} {kind.replace('_keys', '')} ({', '.join(map(str, info[kind][:3]))})"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: {'; '.join(problems)}")
    check_finite_tensors(model.state_dict(), str(source))
    return (model, info) if want_info else model


def _eager(kwargs: dict[str, Any]) -> dict[str, Any]:
    # build on real tensors: our models compute non-persistent buffers (RoPE tables) at construction, which a
    # meta-device (low_cpu_mem_usage) build would leave empty
    return {**kwargs, "low_cpu_mem_usage": False}


class MAETokAutoencoder(ModelMixin, ConfigMixin):
    """A maetok tokenizer as a diffusers autoencoder. Config: the tokenizer's config as a dict."""

    @register_to_config
    def __init__(self, tokenizer_config: dict):
        super().__init__()
        self.tokenizer = build_tokenizer(dict(tokenizer_config), "tokenizer_config")

    @classmethod
    def from_maetok(cls, source: PathLike, device: Optional[Union[str, torch.device]] = None) -> "MAETokAutoencoder":
        """The tokenizer in a maetok folder, run directory or hub id (:func:`maetok.encode.load_tokenizer`)."""
        tokenizer = load_tokenizer(source, "cpu")
        wrapper = cls(tokenizer_config=_tokenizer_config(tokenizer))
        wrapper.tokenizer.load_state_dict(tokenizer.state_dict())
        return wrapper.to(device or "cpu").eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MAETokAutoencoder":
        """diffusers' ``from_pretrained`` (a folder written by :meth:`save_pretrained`, or a hub id), strictly."""
        return _load_strictly(super().from_pretrained, args, kwargs)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(L, H)``: tokens and channels of a latent."""
        return self.tokenizer.config.num_latent_tokens, self.tokenizer.config.latent_dim

    def encode(self, x: Tensor, return_dict: bool = True) -> Union[EncoderOutput, AutoencoderKLOutput, tuple]:
        """images ``(B, C, H, W)`` in [-1, 1] -> ``EncoderOutput(latent=(B, L, H))``; a VAE tokenizer gives
        ``AutoencoderKLOutput(latent_dist=...)`` (mean and log-variance concatenated on the token axis, as
        ``DiagonalGaussianDistribution`` splits its parameters along dim 1)."""
        if self.tokenizer.config.variant == "vae":
            mean, logvar = self.tokenizer.encode_posterior(x)
            dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)
        latents = self.tokenizer.encode(x)
        return EncoderOutput(latent=latents) if return_dict else (latents,)

    def decode(self, z: Tensor, return_dict: bool = True) -> Union[DecoderOutput, tuple]:
        """latents ``(B, L, H)`` -> ``DecoderOutput(sample=(B, C, H, W))`` (unclamped, nominally [-1, 1])."""
        images = self.tokenizer.decode(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: Tensor, return_dict: bool = True) -> Union[DecoderOutput, tuple]:
        """Reconstruction: ``decode(encode(sample))`` (a VAE's posterior mean)."""
        encoded = self.encode(sample)
        latents = encoded.latent_dist.mode() if isinstance(encoded, AutoencoderKLOutput) else encoded.latent
        return self.decode(latents, return_dict=return_dict)


class MAETokTransformer(ModelMixin, ConfigMixin):
    """A SiT / LightningDiT velocity model as a diffusers model. Config: the diffusion model config, the latent
    shape, the classes and ``latent_norm`` (the :class:`~maetok.data.latents.LatentNormalizer` dict undone
    after sampling)."""

    @register_to_config
    def __init__(self, diffusion_model: dict, latent_shape: Sequence[int], num_classes: int,
                 class_names: Optional[list] = None, latent_norm: Optional[dict] = None):
        super().__init__()
        # the latent shape and the classes are also in diffusion_model (folders of maetok <= 0.1 kept them apart)
        self.model = build_diffusion_model(diffusion_model_config(diffusion_model, "diffusion_model", latent_shape,
                                                                  num_classes))

    @classmethod
    def from_latent_generator(cls, generator: LatentGenerator, normalizer: Optional[LatentNormalizer] = None
                              ) -> "MAETokTransformer":
        """Wrap a loaded :class:`LatentGenerator` (its model's weights), with ``normalizer`` (default its own)."""
        wrapper = cls(diffusion_model=to_dict(generator.model.config), latent_shape=list(generator.latent_shape),
                      num_classes=generator.num_classes, class_names=list(generator.class_names),
                      latent_norm=(normalizer or generator.normalizer).to_dict())
        wrapper.model.load_state_dict(generator.model.state_dict())
        return wrapper.to(generator.device).eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MAETokTransformer":
        """diffusers' ``from_pretrained`` (a folder written by :meth:`save_pretrained`, or a hub id), strictly."""
        return _load_strictly(super().from_pretrained, args, kwargs)

    def forward(self, x: Tensor, t: Union[Tensor, float], y: Optional[Tensor] = None) -> Tensor:
        """Velocity ``(B, L, C)`` of noisy latents ``x`` ``(B, L, C)`` at times ``t`` ``(B,)`` (t = 1: noise)."""
        return self.model(x, t, y)

    def latent_generator(self, sampling: SamplingConfig) -> LatentGenerator:
        """The :class:`LatentGenerator` that samples with this model, its latent normalisation and ``sampling``."""
        cfg = self.config
        norm = LatentNormalizer.from_dict(dict(cfg.latent_norm or {"mode": "none", "mean": 0.0, "std": 1.0}))
        return LatentGenerator(self.model, norm, list(cfg.class_names or []), sampling, None)


# SamplingConfig fields the scheduler holds: the latent normalisation is resolved into the transformer, and the
# training grids are not a pipeline's business
_SAMPLER_FIELDS = [f.name for f in dataclasses.fields(SamplingConfig) if f.name not in ("latent_norm", "grid_steps")]


class MAETokSampler(SchedulerMixin, ConfigMixin):
    """The sampler settings of :class:`maetok.config.SamplingConfig` as a diffusers scheduler config (Euler or
    Euler-Maruyama on the linear interpolant, t = 1 noise; guidance scale and interval; the authors' conventions
    where chosen). It holds settings only: :class:`MAETokSiTPipeline` samples through
    :class:`~maetok.diffusion.generator.LatentGenerator`."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, sampler: str = "euler-maruyama", steps: int = 250, cfg_scale: float = 1.0,
                 guidance_low: float = 0.0, guidance_high: float = 1.0, t_end: float = 0.04, last_step: str = "drift",
                 diffusion_form: str = "sigma", cfg_on: str = "velocity", precision: str = "float32"):
        self.sampling_config().validate()

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig) -> "MAETokSampler":
        return cls(**{name: getattr(sampling, name) for name in _SAMPLER_FIELDS})

    def sampling_config(self, **changes: Any) -> SamplingConfig:
        """The :class:`SamplingConfig` these settings give, with ``changes``."""
        values = {name: self.config[name] for name in _SAMPLER_FIELDS}
        return SamplingConfig(**{**values, **changes})


class MAETokSiTPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image generation: a :class:`MAETokTransformer` samples latents with
    the :class:`MAETokSampler` settings, the :class:`MAETokAutoencoder` decodes them."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: MAETokTransformer, vae: MAETokAutoencoder, scheduler: MAETokSampler):
        super().__init__()
        if tuple(transformer.config.latent_shape) != vae.latent_shape:
            raise ValueError(f"the transformer generates latents {tuple(transformer.config.latent_shape)}, the "
                             f"tokenizer decodes {vae.latent_shape}")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @classmethod
    def from_maetok(
        cls,
        model: PathLike,
        tokenizer: Optional[PathLike] = None,
        device: Optional[Union[str, torch.device]] = None,
        latent_scalars: Optional[Sequence[float]] = None,
        **sampling_changes: Any,
    ) -> "MAETokSiTPipeline":
        """A pipeline from a maetok diffusion folder / run directory, the authors' released SiT folder, or a hub
        id of either; ``tokenizer`` (default: the one the model names; required for the authors' SiT). The
        latent normalisation is resolved now (:meth:`LatentGenerator.normalizer_for`, with ``latent_scalars``
        ``(mean, std)`` overriding); ``sampling_changes`` change the model's sampling defaults."""
        generator = LatentGenerator.load(model, "cpu")
        vae = MAETokAutoencoder.from_maetok(generator.tokenizer_source(tokenizer))
        sampling = dataclasses.replace(generator.sampling, **sampling_changes)
        normalizer = generator.normalizer_for(sampling, vae.tokenizer, latent_scalars)
        pipe = cls(MAETokTransformer.from_latent_generator(generator, normalizer), vae,
                   MAETokSampler.from_sampling(sampling))
        return pipe.to(device or "cpu")

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MAETokSiTPipeline":
        """diffusers' ``from_pretrained`` (a folder written by :meth:`save_pretrained`, or a hub id); import
        :mod:`maetok.integrations.diffusers` first, as diffusers loads components only from imported modules."""
        return super().from_pretrained(*args, **_eager(kwargs))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, str, Sequence[Union[int, str]], Tensor]] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[Sequence[float]] = None,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        batch_size: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate ``num_images_per_prompt`` images per label of ``class_labels`` (ids or class names: an int, a name,
        a list or a ``(B,)`` tensor; the images of one label are consecutive; ``None``: the model's unconditional
        branch, ``batch_size`` x ``num_images_per_prompt`` images). ``num_inference_steps``, ``guidance_scale`` and
        ``guidance_interval`` ``(low, high)`` (t = 1 is noise) override the scheduler's settings; the noise comes
        from ``generator`` (a ``torch.Generator``, or a list of them, one per image). ``output_type``: ``"pil"`` (a
        list of PIL images), ``"np"`` (``(B, H, W, C)`` float in [0, 1]) or ``"pt"`` (``(B, C, H, W)`` float in
        [0, 1]). A progress bar runs over the sampling steps (``set_progress_bar_config(disable=True)`` hides it)."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        changes: dict[str, Any] = {}
        if guidance_scale is not None:
            changes["cfg_scale"] = float(guidance_scale)
        if guidance_interval is not None:
            changes.update(guidance_low=float(guidance_interval[0]), guidance_high=float(guidance_interval[1]))
        sampling = self.scheduler.sampling_config(**changes)
        latent_generator = self.transformer.latent_generator(sampling)
        labels = latent_generator.resolve_labels(class_labels)
        if labels is not None:
            labels = labels.repeat_interleave(int(num_images_per_prompt))
            num = labels.numel()
        elif batch_size is None:
            raise ValueError("pass class_labels, or batch_size for unconditional samples")
        else:
            num = int(batch_size) * int(num_images_per_prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != num:
            raise ValueError(f"got a list of {len(generator)} generators for {num} images: pass one per image "
                             f"(class labels x num_images_per_prompt), or a single generator")
        latents = latent_generator.sample_latents(labels, num, sampling, generator=generator,
                                                  steps=num_inference_steps, progress=self.progress_bar)
        vae_device = next(self.vae.parameters()).device
        images = self.vae.decode(latents.to(vae_device)).sample
        images = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            output: Any = images
        else:
            output = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)
