"""Frozen semantic teachers for the auxiliary decoders (paper Eq. 7-8, Table 1b): DINOv2, SigLIP, CLIP
(``transformers`` vision towers loaded from local files only) and an offline VGG16 teacher.

Registered names (``maetok.targets.base.build_target``): ``"dinov2"``, ``"siglip"``, ``"clip"``, ``"vgg16"``.
Every factory takes ``(image_size, patch_size, in_channels, **options)``; common options:

* ``size``: model size (dinov2: s/b/l/g; siglip: so400m/large; clip: l14/l14-336/b16/b32);
* ``weights``: a local Hugging Face model folder (``config.json`` + ``model.safetensors``) or a hub model id
  looked up in the hub cache (``HF_HOME`` / ``HF_HUB_CACHE``) -- nothing is ever downloaded;
* ``config``: a ``transformers`` config object or dict: builds a randomly initialised model of that
  architecture instead of loading weights (tests);
* ``resolution``: ``"grid"`` (teacher input = tokenizer grid x teacher patch, so the teacher's patch grid
  is the tokenizer's; position embeddings interpolated), ``"native"`` (the teacher's pretraining size, then
  the feature map is bilinearly resampled to the tokenizer grid, antialiased where it shrinks) or an int
  (square input of that size, then resampled). Defaults: DINOv2 ``"grid"`` (trained multi-resolution),
  SigLIP / CLIP ``"native"``;
* ``loss``: ``"mse"`` (default, as in the paper) or ``"cosine"``;
* ``normalize``: ``"none"`` (default for ViT teachers) or ``"layernorm"`` (parameter-free per-token
  layer norm of the targets; default for VGG16).

Inputs are ``(B, C, H, W)`` in [-1, 1] (1-channel images are repeated to 3); outputs are
``(B, grid_h * grid_w, dim)`` float32, row-major, without CLS / register tokens. Teachers run without
gradient and always in eval mode.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.assets import PathLike, load_hf_vision_model
from maetok.data.images import to_rgb
from maetok.errors import ConfigError
from maetok.targets.base import FeatureTarget, register_target, resample_to_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_MODELS = {
    "s": "facebook/dinov2-small",
    "b": "facebook/dinov2-base",
    "l": "facebook/dinov2-large",
    "g": "facebook/dinov2-giant",
}
DINOV2_REGISTER_MODELS = {k: v.replace("dinov2-", "dinov2-with-registers-") for k, v in DINOV2_MODELS.items()}
SIGLIP_MODELS = {
    "so400m": "google/siglip-so400m-patch14-384",
    "large": "google/siglip-large-patch16-256",
}
CLIP_MODELS = {
    "l14": "openai/clip-vit-large-patch14",
    "l14-336": "openai/clip-vit-large-patch14-336",
    "b16": "openai/clip-vit-base-patch16",
    "b32": "openai/clip-vit-base-patch32",
}

Resolution = Union[str, int]
_LOSSES = ("mse", "cosine")
_NORMALIZE = ("none", "layernorm")


def _check_choice(kind: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; expected one of {list(choices)}")



def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(-1.0, 1.0)


def _normalize_tokens(features: Tensor, mode: str) -> Tensor:
    if mode == "layernorm":
        return F.layer_norm(features, (features.shape[-1],), eps=1e-6)
    return features


class HFTeacher(FeatureTarget):
    """A frozen ``transformers`` ViT (DINOv2 / SigLIP / CLIP vision tower) as a per-patch feature target.

    forward(images ``(B, C, H, W)`` in [-1, 1], grid_size ``(gh, gw)``) -> ``(B, gh * gw, dim)`` float32.
    """

    def __init__(self, name: str, model: nn.Module, mean: tuple, std: tuple, resolution: Resolution,
                 loss: str = "mse", normalize: str = "none", pos_interpolation_kwarg: bool = False):
        super().__init__()
        _check_choice("target loss", loss, _LOSSES)
        _check_choice("target normalisation", normalize, _NORMALIZE)
        if not (resolution in ("grid", "native") or (isinstance(resolution, int) and resolution > 0)):
            raise ConfigError(f"teacher resolution must be 'grid', 'native' or a positive int, got {resolution!r}")
        self.name = name
        self.model = model
        self.dim = int(model.config.hidden_size)
        self.loss = loss
        self.normalize = normalize
        self.resolution = resolution
        self.teacher_patch = int(model.config.patch_size)
        self.native_size = int(model.config.image_size)
        self.pos_interpolation_kwarg = pos_interpolation_kwarg
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def input_size(self, grid_size: tuple[int, int]) -> tuple[int, int]:
        """Teacher input ``(H, W)`` for a tokenizer grid (see the module doc for ``resolution``)."""
        if self.resolution == "grid":
            return grid_size[0] * self.teacher_patch, grid_size[1] * self.teacher_patch
        side = self.native_size if self.resolution == "native" else int(self.resolution)
        return side, side

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        size = self.input_size(grid_size)
        images = _resize(to_rgb(images, "teacher").float(), size)
        pixels = ((images + 1.0) / 2.0 - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        kwargs = {}
        if self.pos_interpolation_kwarg and size != (self.native_size, self.native_size):
            kwargs["interpolate_pos_encoding"] = True
        tokens = self.model(pixel_values=pixels.to(dtype), **kwargs).last_hidden_state
        source_grid = (size[0] // self.teacher_patch, size[1] // self.teacher_patch)
        num_patches = source_grid[0] * source_grid[1]
        if tokens.shape[1] < num_patches:
            raise RuntimeError(f"{self.name} returned {tokens.shape[1]} tokens for a {source_grid} patch grid")
        patch_tokens = tokens[:, tokens.shape[1] - num_patches:].float()  # drop CLS / register tokens
        features = resample_to_grid(patch_tokens, source_grid, grid_size, antialias=True)  # e.g. 27x27 -> 16x16
        return _normalize_tokens(features, self.normalize)


def _model_id(family: str, table: dict[str, str], size: str) -> str:
    if size not in table:
        raise ConfigError(f"unknown {family} size {size!r}; expected one of {list(table)}")
    return table[size]


@register_target("dinov2")
def build_dinov2_target(
    image_size: int, patch_size: int, in_channels: int, *, size: str = "l", weights: Optional[PathLike] = None,
    config: Any = None, registers: bool = False, resolution: Resolution = "grid", loss: str = "mse",
    normalize: str = "none",
) -> HFTeacher:
    """DINOv2 teacher (default ``facebook/dinov2-large``; ``registers=True``: the with-registers models),
    ImageNet mean/std input normalisation, patch tokens of the last layer (final layer norm applied)."""
    table = DINOV2_REGISTER_MODELS if registers else DINOV2_MODELS
    model = load_hf_vision_model("dinov2_registers" if registers else "dinov2", _model_id("dinov2", table, size),
                                 weights=weights, config=config)
    return HFTeacher("dinov2", model, IMAGENET_MEAN, IMAGENET_STD, resolution, loss, normalize)


@register_target("siglip")
def build_siglip_target(
    image_size: int, patch_size: int, in_channels: int, *, size: str = "so400m",
    weights: Optional[PathLike] = None, config: Any = None, resolution: Resolution = "native", loss: str = "mse",
    normalize: str = "none",
) -> HFTeacher:
    """SigLIP vision tower (default ``google/siglip-so400m-patch14-384``), mean/std 0.5, last layer patch
    tokens (post layer norm; SigLIP has no CLS token)."""
    model = load_hf_vision_model("siglip", _model_id("siglip", SIGLIP_MODELS, size), weights=weights, config=config)
    return HFTeacher("siglip", model, SIGLIP_MEAN, SIGLIP_STD, resolution, loss, normalize,
                     pos_interpolation_kwarg=True)


@register_target("clip")
def build_clip_target(
    image_size: int, patch_size: int, in_channels: int, *, size: str = "l14", weights: Optional[PathLike] = None,
    config: Any = None, resolution: Resolution = "native", loss: str = "mse", normalize: str = "none",
) -> HFTeacher:
    """CLIP vision tower (default ``openai/clip-vit-large-patch14``), CLIP's own mean/std, last layer patch
    tokens (CLS dropped)."""
    model = load_hf_vision_model("clip", _model_id("clip", CLIP_MODELS, size), weights=weights, config=config)
    return HFTeacher("clip", model, CLIP_MEAN, CLIP_STD, resolution, loss, normalize, pos_interpolation_kwarg=True)


class VGG16Teacher(FeatureTarget):
    """Offline semantic teacher: the packaged VGG16's ``relu5_3`` (stride 16) or ``relu4_3`` (stride 8)
    features, dim 512. The input is resized to ``grid x stride`` so the feature map is the tokenizer grid.

    forward(images ``(B, C, H, W)`` in [-1, 1], grid_size) -> ``(B, gh * gw, 512)`` float32.
    """

    def __init__(self, layer: str = "relu5_3", weights: Optional[PathLike] = None, pretrained: bool = True,
                 loss: str = "mse", normalize: str = "layernorm"):
        super().__init__()
        from maetok.losses.vgg import load_vgg16_features  # local: keeps maetok.targets import-light

        _check_choice("VGG16 teacher layer", layer, ("relu4_3", "relu5_3"))
        _check_choice("target loss", loss, _LOSSES)
        _check_choice("target normalisation", normalize, _NORMALIZE)
        self.name = "vgg16"
        self.vgg = load_vgg16_features((layer,), weights=weights, pretrained=pretrained)
        self.stride = self.vgg.strides[0]
        self.dim = self.vgg.channels[0]
        self.loss = loss
        self.normalize = normalize
        self.eval()

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        images = _resize(to_rgb(images, "teacher").float(), (grid_size[0] * self.stride, grid_size[1] * self.stride))
        dtype = next(self.vgg.parameters()).dtype
        features = self.vgg(images.to(dtype))[0].float()  # (B, 512, gh, gw)
        return _normalize_tokens(features.flatten(2).transpose(1, 2), self.normalize)


@register_target("vgg16")
def build_vgg16_target(
    image_size: int, patch_size: int, in_channels: int, *, layer: str = "relu5_3",
    weights: Optional[PathLike] = None, pretrained: bool = True, loss: str = "mse", normalize: str = "layernorm",
) -> VGG16Teacher:
    """VGG16 teacher from the packaged LPIPS/VGG16 weights (``weights``: optional path for
    :func:`maetok.assets.ensure_lpips_weights`; ``pretrained=False``: random weights, tests only)."""
    return VGG16Teacher(layer, weights=weights, pretrained=pretrained, loss=loss, normalize=normalize)
