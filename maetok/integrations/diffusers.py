"""maetok models as diffusers components (the ``maetok[diffusers]`` extra): save, load and call them with diffusers.

* :class:`MAETokAutoencoder`: a tokenizer as a diffusers ``ModelMixin`` + ``ConfigMixin``, used as an
  ``AutoencoderKL``: ``encode(x).latent_dist`` (:class:`~maetok.data.distribution.LatentDistribution`: a VAE's
  posterior, a point mass for AE / MAETok; ``.latent`` is its mode), ``decode(z).sample``, and the latent statistics
  in ``config.scaling_factor`` / ``config.shift_factor`` (``z = (latent - shift_factor) * scaling_factor``); images
  ``(B, C, H, W)`` in [-1, 1], latents ``(B, L, H)``.
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
    pipe.save_pretrained("out/pipe");  MAETokSiTPipeline.from_pretrained("out/pipe", torch_dtype=torch.bfloat16)

Each component's ``from_pretrained`` also reads maetok's own folders (and the authors'), ``torch_dtype=`` and
``device=`` as every maetok loader (default float32 on the CPU); the models cast their inputs to their dtype, so a
bfloat16 pipeline (or ``pipe.to(torch.bfloat16)``) runs as it is. Weights are read from safetensors only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

try:
    from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError:  # one line, naming the extra
    raise ImportError("maetok.integrations.diffusers needs diffusers: pip install 'maetok[diffusers]'") from None

from maetok.assets import resolve_pretrained
from maetok.config import SamplingConfig
from maetok.data.latents import LatentNormalizer
from maetok.diffusion.generator import LatentGenerator
from maetok.model_folders import (
    ModelFolder,
    build_tokenizer,
    check_weights_file,
    diffusers_config,
    diffusion_model_config,
    latent_scaling,
    load_tokenizer,
    place_model,
    read_folder,
)
from maetok.models.sit import build_diffusion_model
from maetok.models.tokenizer import MAETok

__all__ = ["MAETokAutoencoder", "MAETokTransformer", "MAETokSampler", "MAETokSiTPipeline"]

PathLike = Union[str, Path]


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


#: what a component's from_pretrained takes for a maetok (or the authors') folder besides torch_dtype / dtype / device;
#: the rest of diffusers' loading options apply to diffusers folders only
_MAETOK_FOLDER_OPTIONS = ("subfolder", "low_cpu_mem_usage", "use_safetensors")


def _from_pretrained(cls: type, load_diffusers: Callable, source: Union[str, Path], kwargs: dict[str, Any],
                     load_ours: Callable[[ModelFolder], Any]) -> Any:
    """A component's ``from_pretrained``: a folder (or ``subfolder`` of a folder or hub id) in diffusers' format through
    ``load_diffusers`` (diffusers' loader, strictly, from safetensors only: pickle weights are refused, never loaded),
    one in maetok's or the authors' format through ``load_ours``; then on ``device`` in ``torch_dtype`` (or diffusers'
    spelling ``dtype``), as every maetok loader (:func:`~maetok.model_folders.place_model`)."""
    device = kwargs.pop("device", None)
    dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
    directory = resolve_pretrained(source)
    if kwargs.get("subfolder"):
        directory = directory / kwargs.pop("subfolder")
    folder = read_folder(directory)
    if folder.format.startswith("diffusers-"):
        check_weights_file(folder.weights_path)
        loaded = _load_strictly(load_diffusers, (str(folder.directory),), {**kwargs, "use_safetensors": True})
        # placed and cast again: diffusers' loader leaves some models (a SiT) in float32 whatever torch_dtype says
        if isinstance(loaded, tuple):  # output_loading_info=True
            return place_model(loaded[0], device, dtype), loaded[1]
        return place_model(loaded, device, dtype)
    others = sorted(name for name, value in kwargs.items()
                    if value is not None and name not in (*_MAETOK_FOLDER_OPTIONS, "torch_dtype", "dtype"))
    if others:
        raise TypeError(f"{cls.__name__}.from_pretrained: {', '.join(others)} apply to diffusers folders only; "
                        f"{folder.directory} is a {folder.format} folder")
    return place_model(load_ours(folder), device, dtype)


@dataclasses.dataclass
class MAETokEncoderOutput(AutoencoderKLOutput):
    """What :meth:`MAETokAutoencoder.encode` returns: ``AutoencoderKL.encode``'s ``latent_dist`` (a
    :class:`~maetok.data.distribution.LatentDistribution` over ``(B, L, H)``) and ``latent``, its mode (what
    ``MAETok.encode`` returns)."""

    latent: Optional[Tensor] = None


class MAETokAutoencoder(ModelMixin, ConfigMixin):
    """A maetok tokenizer as a diffusers autoencoder, with ``AutoencoderKL``'s interface. Config: the tokenizer's
    config as a dict, and its latent statistics as ``scaling_factor`` / ``shift_factor`` (diffusers' convention
    ``z = (latent - shift_factor) * scaling_factor``; by default from the tokenizer's ``latent_mean`` / ``latent_std``,
    the identity when they were never measured: :func:`~maetok.model_folders.latent_scaling`)."""

    @register_to_config
    def __init__(self, tokenizer_config: dict, scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None):
        super().__init__()
        self.tokenizer = build_tokenizer(dict(tokenizer_config), "tokenizer_config")
        measured = latent_scaling(self.tokenizer)
        self.register_to_config(scaling_factor=measured["scaling_factor"] if scaling_factor is None else scaling_factor,
                                shift_factor=measured["shift_factor"] if shift_factor is None else shift_factor)

    @classmethod
    def from_tokenizer(cls, tokenizer: MAETok) -> "MAETokAutoencoder":
        """Wrap a loaded tokenizer (a copy of its weights, float32 on the CPU)."""
        wrapper = cls(**diffusers_config(tokenizer)[1])
        wrapper.tokenizer.load_state_dict(tokenizer.state_dict())
        return wrapper.eval()

    @classmethod
    def from_maetok(cls, source: PathLike, device: Optional[Union[str, torch.device]] = None,
                    torch_dtype: Optional[Union[str, torch.dtype]] = None) -> "MAETokAutoencoder":
        """The tokenizer in a maetok folder, run directory or hub id (:func:`maetok.model_folders.load_tokenizer`),
        on ``device`` (default the CPU) in ``torch_dtype`` (default float32)."""
        return place_model(cls.from_tokenizer(load_tokenizer(source)), device, torch_dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, **kwargs: Any) -> "MAETokAutoencoder":
        """A folder written by :meth:`save_pretrained` (or ``maetok convert --to diffusers``), a maetok or authors'
        tokenizer folder, a run directory or a hub id, strictly, from safetensors only; ``torch_dtype`` (or ``dtype``)
        and ``device`` as every maetok loader."""
        return _from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs,
                                lambda folder: cls.from_tokenizer(load_tokenizer(folder)))

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(L, H)``: tokens and channels of a latent."""
        return self.tokenizer.config.num_latent_tokens, self.tokenizer.config.latent_dim

    def encode(self, x: Tensor, return_dict: bool = True) -> Union[MAETokEncoderOutput, tuple]:
        """images ``(B, C, H, W)`` in [-1, 1] (cast to the model's dtype) -> ``latent_dist``, the
        :class:`~maetok.data.distribution.LatentDistribution` of the latents ``(B, L, H)`` (a VAE's posterior, a point
        mass for AE / MAETok), and ``latent``, its mode; ``return_dict=False``: ``(latent_dist,)``, as
        ``AutoencoderKL``."""
        dist = self.tokenizer.encode_distribution(x)
        return MAETokEncoderOutput(latent_dist=dist, latent=dist.mode()) if return_dict else (dist,)

    def decode(self, z: Tensor, return_dict: bool = True) -> Union[DecoderOutput, tuple]:
        """latents ``(B, L, H)`` -> ``DecoderOutput(sample=(B, C, H, W))`` (unclamped, nominally [-1, 1]; the model's
        dtype)."""
        images = self.tokenizer.decode(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None) -> Union[DecoderOutput, tuple]:
        """Reconstruction, as ``AutoencoderKL``: ``decode`` of the posterior's mode, or of a sample from it drawn with
        ``generator`` when ``sample_posterior``."""
        dist = self.encode(sample).latent_dist
        latents = dist.sample(generator) if sample_posterior else dist.mode()
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
        """Wrap a loaded :class:`LatentGenerator` (its model's weights, device and dtype), with ``normalizer``
        (default its own)."""
        config = diffusers_config(generator.model)[1]
        config.update(class_names=list(generator.class_names), latent_norm=(normalizer or generator.normalizer).to_dict())
        wrapper = cls(**config)
        wrapper.model.load_state_dict(generator.model.state_dict())
        return place_model(wrapper, generator.device, next(generator.model.parameters()).dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, **kwargs: Any) -> "MAETokTransformer":
        """A folder written by :meth:`save_pretrained` (or ``maetok convert --to diffusers``), a maetok diffusion folder
        (with its latent normalisation and classes), the authors' SiT folder, a run directory or a hub id, strictly,
        from safetensors only; ``torch_dtype`` (or ``dtype``) and ``device`` as every maetok loader."""
        return _from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs,
                                lambda folder: cls.from_latent_generator(LatentGenerator.load(folder)))

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
        torch_dtype: Optional[Union[str, torch.dtype]] = None,
        **sampling_changes: Any,
    ) -> "MAETokSiTPipeline":
        """A pipeline from a maetok diffusion folder / run directory, the authors' released SiT folder, or a hub
        id of either; ``tokenizer`` (default: the one the model names; required for the authors' SiT). The
        latent normalisation is resolved now (:meth:`LatentGenerator.normalizer_for`, with ``latent_scalars``
        ``(mean, std)`` overriding); ``sampling_changes`` change the model's sampling defaults. On ``device`` (default
        the CPU) in ``torch_dtype`` (default float32)."""
        generator = LatentGenerator.load(model, device, torch_dtype)
        vae = MAETokAutoencoder.from_maetok(generator.tokenizer_source(tokenizer), device, torch_dtype)
        sampling = dataclasses.replace(generator.sampling, **sampling_changes)
        normalizer = generator.normalizer_for(sampling, vae.tokenizer, latent_scalars)
        return cls(MAETokTransformer.from_latent_generator(generator, normalizer), vae,
                   MAETokSampler.from_sampling(sampling))

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
