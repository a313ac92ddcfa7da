"""Projected-GAN / StyleGAN-T style discriminator: a frozen pretrained backbone gives several intermediate
feature maps, a light trainable head per tap turns each into a map of logits, and all logits are
concatenated to ``(B, K)``.

Backbones:

* ``"dinov2"`` (the paper's choice, DINOv2-S): ``transformers.Dinov2Model`` from a local folder or the hub
  cache (``facebook/dinov2-small``), images resized to ``input_size`` (default 224, a multiple of the patch
  size) and ImageNet-normalised; taps are the token outputs of several blocks (CLS/register tokens dropped)
  reshaped to ``(B, D, h, w)`` maps. Blocks after the deepest tap are removed.
* ``"vgg16"`` (offline default): the packaged VGG16 (:mod:`maetok.losses.vgg`) with taps at
  relu2_2 / relu3_3 / relu4_3 / relu5_3, at the image's own resolution unless ``input_size`` is given.

The backbone is frozen (``requires_grad=False``), always in eval mode, excluded from
:meth:`ProjectedDiscriminator.trainable_parameters` and from the discriminator's ``state_dict`` (it is
rebuilt from its weights; loading a state dict leaves it untouched). Gradients still flow through it to the
input images, as the generator loss needs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from maetok.assets import PathLike, load_hf_vision_model
from maetok.data.images import to_rgb
from maetok.losses.vgg import load_vgg16_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureBackbone(nn.Module):
    """Frozen multi-tap feature extractor. forward: images ``(B, C, H, W)`` in [-1, 1] -> list of maps
    ``(B, channels[i], h_i, w_i)``."""

    channels: list[int]

    def train(self, mode: bool = True) -> "FeatureBackbone":
        return super().train(False)

    def freeze(self) -> "FeatureBackbone":
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return super().train(False)



class VGG16Backbone(FeatureBackbone):
    """The packaged VGG16 conv stack as a discriminator backbone (LPIPS input scaling included)."""

    def __init__(self, taps: Sequence[str] = ("relu2_2", "relu3_3", "relu4_3", "relu5_3"),
                 weights: Optional[PathLike] = None, pretrained: bool = True, input_size: Optional[int] = None):
        super().__init__()
        self.vgg = load_vgg16_features(taps, weights=weights, pretrained=pretrained)
        self.channels = self.vgg.channels
        self.input_size = input_size
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        images = to_rgb(images, "discriminator")
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.vgg(images)


class DINOv2Backbone(FeatureBackbone):
    """DINOv2 ViT as a discriminator backbone; taps are block outputs reshaped to patch-grid maps.

    ``layers``: 0-based block indices (default: four evenly spaced blocks ending at the last, e.g. 2, 5, 8, 11
    for ViT-S/B). ``weights``: local folder or hub id (default ``model_id``); ``config``: a
    ``Dinov2Config`` (or dict) to build a random model instead (tests).
    """

    def __init__(self, model_id: str = "facebook/dinov2-small", weights: Optional[PathLike] = None,
                 config: Any = None, layers: Optional[Sequence[int]] = None, input_size: int = 224):
        super().__init__()
        model = load_hf_vision_model("dinov2", model_id, weights=weights, config=config)
        depth = model.config.num_hidden_layers
        if layers is None:
            step = max(depth // 4, 1)
            layers = sorted({min(depth - 1, i) for i in range(step - 1, depth, step)})[-4:]
        layers = [int(i) for i in layers]
        if not layers or min(layers) < 0 or max(layers) >= depth:
            raise ValueError(f"DINOv2 tap layers {layers} out of range for a {depth}-block model")
        self.layers = layers
        model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[: max(layers) + 1])  # drop unused blocks
        self.model = model
        self.patch_size = int(model.config.patch_size)
        if input_size % self.patch_size:
            raise ValueError(f"DINOv2 input_size {input_size} is not a multiple of its patch size {self.patch_size}")
        self.input_size = input_size
        self.prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.channels = [int(model.config.hidden_size)] * len(layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        images = to_rgb(images, "discriminator")
        size = (self.input_size, self.input_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        pixels = ((images + 1.0) / 2.0 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        outputs = self.model(pixel_values=pixels, output_hidden_states=True)
        grid = self.input_size // self.patch_size
        maps = []
        for layer in self.layers:
            tokens = outputs.hidden_states[layer + 1][:, self.prefix_tokens:]  # (B, grid*grid, D)
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid))
        return maps


class DiscriminatorHead(nn.Module):
    """Light trainable head on one feature map: spectral-norm 1x1 conv -> residual 3x3 conv -> 1x1 conv to
    one logit per position. ``(B, C, h, w)`` -> ``(B, h * w)``."""

    def __init__(self, in_channels: int, hidden_channels: int = 128, negative_slope: float = 0.2):
        super().__init__()
        self.project = spectral_norm(nn.Conv2d(in_channels, hidden_channels, kernel_size=1))
        self.mix = spectral_norm(nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1))
        self.to_logits = spectral_norm(nn.Conv2d(hidden_channels, 1, kernel_size=1))
        self.negative_slope = negative_slope

    def forward(self, features: Tensor) -> Tensor:
        h = F.leaky_relu(self.project(features), self.negative_slope)
        h = h + F.leaky_relu(self.mix(h), self.negative_slope)
        return self.to_logits(h).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """Frozen backbone + one trainable head per tap. forward: images ``(B, C, H, W)`` in [-1, 1] -> logits
    ``(B, K)`` with ``K = sum_i h_i * w_i`` over the taps."""

    def __init__(self, backbone: FeatureBackbone, hidden_channels: int = 128):
        super().__init__()
        self.backbone = backbone.freeze()
        self.heads = nn.ModuleList(DiscriminatorHead(c, hidden_channels) for c in backbone.channels)
        # keep the frozen backbone out of checkpoints: dropped on save, filled from itself on load
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_drop_backbone_from_state_dict)
        else:  # older torch
            self._register_state_dict_hook(_drop_backbone_from_state_dict)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_fill_backbone_into_state_dict)
        else:  # older torch
            self._register_load_state_dict_pre_hook(_fill_backbone_into_state_dict, with_module=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (what the discriminator optimizer updates)."""
        return list(self.heads.parameters())

    def train(self, mode: bool = True) -> "ProjectedDiscriminator":
        super().train(mode)
        self.backbone.train(False)
        return self

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        return torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)


def _drop_backbone_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]


def _fill_backbone_into_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                                   strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    for key, value in module.backbone.state_dict(prefix=prefix + "backbone.").items():
        state_dict.setdefault(key, value)


def build_discriminator(
    backbone: str = "vgg16",
    *,
    weights: Optional[PathLike] = None,
    config: Any = None,
    layers: Optional[Sequence[int]] = None,
    taps: Optional[Sequence[str]] = None,
    input_size: Optional[int] = None,
    hidden_channels: int = 128,
    pretrained: bool = True,
    model_id: str = "facebook/dinov2-small",
) -> ProjectedDiscriminator:
    """Build a :class:`ProjectedDiscriminator`.

    backbone ``"dinov2"``: ``model_id`` / ``weights`` (local folder or hub id, never downloaded) or ``config``
    (random tiny model for tests), ``layers`` (block indices), ``input_size`` (default 224).
    backbone ``"vgg16"``: packaged weights (``weights`` = optional path for
    :func:`maetok.assets.ensure_lpips_weights`; ``pretrained=False`` = random, tests), ``taps``,
    ``input_size`` (default: the image's own size).
    """
    if backbone == "dinov2":
        net: FeatureBackbone = DINOv2Backbone(model_id, weights=weights, config=config, layers=layers,
                                              input_size=input_size or 224)
    elif backbone == "vgg16":
        net = VGG16Backbone(taps or ("relu2_2", "relu3_3", "relu4_3", "relu5_3"), weights=weights,
                            pretrained=pretrained, input_size=input_size)
    else:
        raise ValueError(f"unknown discriminator backbone {backbone!r}; expected 'dinov2' or 'vgg16'")
    return ProjectedDiscriminator(net, hidden_channels=hidden_channels)
