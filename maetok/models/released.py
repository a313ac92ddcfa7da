"""The authors' released MAETok (Hugging Face ``MAETok/maetok-b-128`` and its 512px variant), built from our blocks.

Every way the released architecture differs from ours (``shared/docs/METHOD.md`` §5), and the mapping of their
checkpoint keys onto our modules, live in this one module; the loader switches it on when a checkpoint asks for it:

* encoder: a cls token and a learned absolute position embedding (``pos_embed``, cls position included) *and*
  "RoPE-mixed" (learnable per-layer, per-head 2D frequencies ``freqs``, theta 10 at initialisation) on the image
  tokens only (cls and latent tokens unrotated); LayerScale (``ls1`` / ``ls2``); LayerNorm eps 1e-6;
* decoder: a learned mask token as every image query (no query position embedding: the decoder's own learnable
  RoPE frequencies ``decoder.freqs`` place them), and blocks whose *latent* positions are modulated,
  ``norm(x) * scale + shift``, with shift / scale computed from the raw latent (``SiLU -> Linear``, LayerNorm
  without affine); the final norm is modulated the same way;
* a scalar latent mean / std in the config (``vq_mean`` / ``vq_std``): :attr:`ReleasedArchitecture.latent_mean`,
  exposed as ``tokenizer.latent_mean`` / ``tokenizer.latent_std``. The authors' diffusion models train on
  ``(latents - latent_mean) / latent_std``; encode / decode themselves never use them.

The architecture follows the keys in the weights, not the config's flags (their ``config.json`` says
``use_ape: false`` while the weights hold ``pos_embed``). Widths, depths, patch size, latent size and MLP ratio
are read from the weights; head counts from :data:`TIMM_ARCHITECTURES` (their config's timm model names),
overridden by ``encoder_model_kwargs`` / ``decoder_model_kwargs`` (``embed_dim``, ``depth``, ``num_heads``) when
present. Keys that encode / decode never use are consumed by :data:`IGNORED_KEYS`; nothing else is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

from maetok.config import MAX_IMAGE_SIZE, ConfigError, TokenizerConfig, check_numbers, to_dict
from maetok.errors import ModelFolderError
from maetok.models.blocks import (
    Attention,
    Block,
    Mlp,
    PatchEmbed,
    Rope,
    init_vit_weights,
    mixed_rope,
    rope_grid_positions,
)
from maetok.models.tokenizer import MAETok

PathLike = Union[str, Path]
T = TypeVar("T")

#: the key of our ``config.json`` that switches the released architecture on (absent: our architecture)
ARCHITECTURE_KEY = "released_architecture"

#: their timm model names (tag such as ``.lvd142m`` and ``_movq`` / ``_movqv2`` suffix removed) -> (width, depth, heads)
TIMM_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_patch14_dinov2": (192, 12, 3),
    "vit_small_patch14_dinov2": (384, 12, 6),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 24, 16),
    "vit_small_patch14_reg4_dinov2": (384, 12, 6),
    "vit_base_patch14_reg4_dinov2": (768, 12, 12),
    "vit_large_patch14_reg4_dinov2": (1024, 24, 16),
}

#: keys of their checkpoint that encode / decode never use (``unused_by_encode_decode`` of the compat listing):
#: the encoder's training mask token, and the decoder's timm patch embedding and position table, which their
#: decoder builds but never applies (its queries are the mask token, placed by RoPE).
IGNORED_KEYS: tuple[str, ...] = (
    "encoder.mask_token",
    "decoder.model.pos_embed",
    "decoder.model.patch_embed.proj.weight",
    "decoder.model.patch_embed.proj.bias",
)
#: prefixes of training-only modules their saver writes when trained with REPA (a frozen teacher + projection)
IGNORED_TRAINING_PREFIXES: tuple[str, ...] = ("repa_model.", "projection.")

#: their key prefix -> ours (both directions of the mapping come from this one table; other keys keep their name)
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("encoder.model.cls_token", "encoder.cls_token"),
    ("encoder.model.pos_embed", "encoder.pos_embed"),
    ("encoder.model.patch_embed.", "encoder.patch_embed."),
    ("encoder.model.blocks.", "encoder.blocks."),
    ("encoder.model.norm.", "encoder.norm."),
    ("quant_conv.", "encoder.to_latent."),
    ("post_quant_conv.", "decoder.latent_proj."),
    ("decoder.model.blocks.", "decoder.blocks."),
    ("decoder.model.norm.", "decoder.norm."),
    ("decoder.to_pixel.model.", "decoder.head."),
    ("encoder.freqs", "encoder.rope.freqs"),  # also freqs_t_x / freqs_t_y, the stored patch positions
    ("decoder.freqs", "decoder.rope.freqs"),
)
#: keys whose presence is required: the released architecture without them is not implemented
REQUIRED_KEYS = {
    "encoder.freqs": "the encoder's RoPE-mixed frequencies",
    "decoder.freqs": "the decoder's RoPE-mixed frequencies",
    "decoder.model.blocks.0.adaLN_modulation.1.weight": "the decoder's latent modulation",
    "encoder.model.patch_embed.proj.weight": "the encoder's patch embedding",
}

LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-5


def to_our_key(key: str) -> str:
    """Their checkpoint key -> the name of the same tensor in :class:`ReleasedMAETok`."""
    for theirs, ours in KEY_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def to_authors_key(key: str) -> str:
    """A :class:`ReleasedMAETok` key -> the name their saver gives it (inverse of :func:`to_our_key`)."""
    for theirs, ours in KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def is_ignored_key(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_TRAINING_PREFIXES)


@dataclass
class ReleasedArchitecture:
    """What the released architecture adds to a :class:`~maetok.config.TokenizerConfig` (the variant switches).
    Stored under ``released_architecture`` in the ``config.json`` of a converted model."""

    encoder_cls_token: bool = True  # a cls token before the patch tokens
    encoder_pos_embed: bool = True  # a learned absolute position embedding (cls position included)
    rope_grid: int = 16  # side of the patch grid of the stored RoPE positions (their base_image_size / patch)
    latent_mean: float = 0.0  # scalar latent normalisation of their diffusion models (their vq_mean)
    latent_std: float = 1.0  # (their vq_std)

    def validate(self) -> None:
        check_numbers(self, ARCHITECTURE_KEY, {"rope_grid": (1, MAX_IMAGE_SIZE)})


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


def _modulate_latents(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x`` with its last L positions replaced by ``x * scale + shift`` (their convention: no ``1 +``).
    x: ``(B, N + L, D)``; shift / scale: ``(B, L, D)``."""
    num_latent = shift.shape[1]
    return torch.cat([x[:, :-num_latent], x[:, -num_latent:] * scale + shift], dim=1)


class _MixedRope(nn.Module):
    """Learnable per-layer, per-head 2D RoPE frequencies and the stored patch positions they are applied at."""

    def __init__(self, depth: int, width: int, num_heads: int, rope_grid: int):
        super().__init__()
        self.num_heads = num_heads
        self.freqs = nn.Parameter(torch.zeros(2, depth, width // 2))
        pos_x, pos_y = rope_grid_positions(rope_grid, rope_grid)
        self.register_buffer("freqs_t_x", pos_x)
        self.register_buffer("freqs_t_y", pos_y)

    def init_frequencies(self, theta: float) -> None:
        """Their initialisation: magnitudes ``theta ** (-4i / head_dim)``, a random direction per head and layer."""
        depth, half = self.freqs.shape[1], self.freqs.shape[2]
        head_dim = 2 * half // self.num_heads
        mag = theta ** (-torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
        angles = torch.rand(depth, self.num_heads, 1) * 2 * torch.pi
        fx = torch.cat([mag * angles.cos(), mag * (torch.pi / 2 + angles).cos()], dim=-1)
        fy = torch.cat([mag * angles.sin(), mag * (torch.pi / 2 + angles).sin()], dim=-1)
        with torch.no_grad():
            self.freqs.copy_(torch.stack([fx, fy]).reshape(2, depth, -1))

    def forward(self, grid: tuple[int, int], num_before: int, num_after: int) -> list[Rope]:
        """One ``(cos, sin)`` per layer for ``[num_before unrotated ; grid tokens ; num_after unrotated]``. The
        stored positions serve when they cover the grid's token count, else the grid's own (as theirs)."""
        gh, gw = grid
        if self.freqs_t_x.shape[0] == gh * gw:
            pos_x, pos_y = self.freqs_t_x, self.freqs_t_y
        else:
            pos_x, pos_y = (p.to(self.freqs.device) for p in rope_grid_positions(gw, gh))
        return mixed_rope(self.freqs, pos_x, pos_y, self.num_heads, num_before, num_after)


class ReleasedEncoder(nn.Module):
    """``[cls ; patches] + pos_embed ; latent tokens + latent_pos_embed`` through LayerScale blocks with RoPE-mixed
    on the patches; the last L positions, normed and projected, are the latents.
    ``forward(images (B, C, H, W), mask=None) -> (B, L, latent_dim)``."""

    def __init__(self, cfg: TokenizerConfig, arch: ReleasedArchitecture):
        super().__init__()
        width, p = cfg.encoder_width, cfg.patch_size
        self.num_latent_tokens = cfg.num_latent_tokens
        self.patch_embed = PatchEmbed(p, cfg.in_channels, width)
        self.num_prefix_tokens = int(arch.encoder_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if arch.encoder_cls_token else None
        num_tokens = (cfg.image_size // p) ** 2 + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width)) if arch.encoder_pos_embed else None
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, width))
        self.rope = _MixedRope(cfg.encoder_depth, width, cfg.encoder_heads, arch.rope_grid)
        self.blocks = nn.ModuleList(
            Block(width, cfg.encoder_heads, cfg.mlp_ratio, layer_scale_init=cfg.layer_scale_init or None)
            for _ in range(cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.to_latent = nn.Linear(width, cfg.latent_dim)
        self.apply(init_vit_weights)
        for param in (self.cls_token, self.pos_embed, self.latent_tokens, self.latent_pos_embed):
            if param is not None:
                nn.init.normal_(param, std=0.02)
        self.rope.init_frequencies(cfg.rope_theta)

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if mask is not None:
            raise ValueError("the released encoder is loaded for encoding only (its training mask token is not "
                             "loaded): fine-tune it without masking (finetune.mask_ratio_start=0)")
        x = self.patch_embed(images)  # (B, N, D)
        p = self.patch_embed.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        b = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            if self.pos_embed.shape[1] != x.shape[1]:
                raise ValueError(f"the released encoder's position embedding covers "
                                 f"{self.pos_embed.shape[1] - self.num_prefix_tokens} patches; images of "
                                 f"{tuple(images.shape[-2:])} give {grid[0] * grid[1]}")
            x = x + self.pos_embed.to(x.dtype)
        latent = (self.latent_tokens + self.latent_pos_embed).expand(b, -1, -1).to(x.dtype)
        x = torch.cat([x, latent], dim=1)  # (B, prefix + N + L, D)
        ropes = self.rope(grid, self.num_prefix_tokens, self.num_latent_tokens)
        for block, rope in zip(self.blocks, ropes):
            x = block(x, rope)
        return self.to_latent(self.norm(x[:, -self.num_latent_tokens:]))


class LatentModulatedBlock(nn.Module):
    """Pre-norm block (LayerNorm without affine) whose latent positions are modulated after each norm with a
    shift / scale computed from the raw latent: ``adaLN_modulation(latents) -> (B, L, 4 D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, latent_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 4 * dim))

    def forward(self, x: Tensor, latents: Tensor, rope: Rope) -> Tensor:
        """x: ``(B, N + L, D)``; latents: the raw ``(B, L, latent_dim)``."""
        shift_attn, scale_attn, shift_mlp, scale_mlp = self.adaLN_modulation(latents).chunk(4, dim=-1)
        x = x + self.attn(_modulate_latents(self.norm1(x), shift_attn, scale_attn), rope)
        return x + self.mlp(_modulate_latents(self.norm2(x), shift_mlp, scale_mlp))


class LatentModulatedNorm(nn.Module):
    """The decoder's final norm: LayerNorm without affine, latent positions modulated from the raw latent."""

    def __init__(self, dim: int, latent_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * dim))

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(latents).chunk(2, dim=-1)
        return _modulate_latents(self.norm(x), shift, scale)


class ReleasedDecoder(nn.Module):
    """``[mask token x N ; latent_proj(latents) + latent_pos_embed]`` through latent-modulated blocks with the
    decoder's own RoPE-mixed on the N queries; the first N positions -> patches.
    ``forward(latents (B, L, latent_dim), grid (gh, gw)) -> (B, gh * gw, p * p * C)``."""

    def __init__(self, cfg: TokenizerConfig, arch: ReleasedArchitecture):
        super().__init__()
        width = cfg.decoder_width
        self.num_latent_tokens = cfg.num_latent_tokens
        self.latent_proj = nn.Linear(cfg.latent_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, width))
        self.rope = _MixedRope(cfg.decoder_depth, width, cfg.decoder_heads, arch.rope_grid)
        self.blocks = nn.ModuleList(
            LatentModulatedBlock(width, cfg.decoder_heads, cfg.mlp_ratio, cfg.latent_dim)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = LatentModulatedNorm(width, cfg.latent_dim)
        self.head = nn.Linear(width, cfg.patch_size**2 * cfg.in_channels)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.latent_pos_embed, std=0.02)
        for module in [*self.blocks, self.norm]:  # zero modulation at initialisation, as theirs
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
        self.rope.init_frequencies(cfg.rope_theta)

    def forward(self, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        b, num_queries = latents.shape[0], grid[0] * grid[1]
        z = self.latent_proj(latents) + self.latent_pos_embed
        x = torch.cat([self.mask_token.expand(b, num_queries, -1).to(z.dtype), z], dim=1)  # (B, N + L, D)
        ropes = self.rope(grid, 0, self.num_latent_tokens)
        for block, rope in zip(self.blocks, ropes):
            x = block(x, latents, rope)
        return self.head(self.norm(x, latents)[:, :num_queries])


class ReleasedMAETok(MAETok):
    """The released MAETok: :class:`~maetok.models.tokenizer.MAETok`'s interface (``encode`` / ``decode`` /
    ``forward`` / ``save_pretrained``) on the released encoder and decoder. ``latent_mean`` / ``latent_std``:
    their scalar latent normalisation."""

    def __init__(self, config: TokenizerConfig, architecture: ReleasedArchitecture):
        nn.Module.__init__(self)
        config.validate()
        architecture.validate()
        if config.variant != "maetok":
            raise ConfigError(f"the released architecture is a plain-bottleneck 'maetok', got variant {config.variant!r}")
        self.config = config
        self.architecture = architecture
        self.encoder = ReleasedEncoder(config, architecture)
        self.decoder = ReleasedDecoder(config, architecture)
        self.aux_decoders = nn.ModuleDict()
        self.latent_mean = architecture.latent_mean
        self.latent_std = architecture.latent_std

    def config_dict(self) -> dict[str, Any]:
        return {**to_dict(self.config), ARCHITECTURE_KEY: to_dict(self.architecture)}

    def untrained_copy(self) -> "ReleasedMAETok":
        return ReleasedMAETok(self.config, self.architecture)


# ---------------------------------------------------------------------------------------------------------
# Their format: config.json (flat ModelArgs) + model.safetensors (their key names)
# ---------------------------------------------------------------------------------------------------------

def timm_architecture(name: str) -> Optional[tuple[int, int, int]]:
    """(width, depth, heads) of one of their timm model names, or ``None`` for a name the table lacks."""
    base = re.sub(r"_movq(v2)?$", "", name.split(".")[0])
    return TIMM_ARCHITECTURES.get(base)


def _block_count(shapes: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _num_heads(config: Mapping[str, Any], part: str, width: int, depth: int, source: PathLike) -> int:
    """Heads of the encoder or decoder: ``<part>_model_kwargs.num_heads``, else the timm table's when the table's
    width agrees with the weights'. A width or depth the kwargs state must agree with the weights."""
    name = str(config.get(f"{part}_model", ""))
    kwargs = config.get(f"{part}_model_kwargs") or {}
    for key, found in (("embed_dim", width), ("depth", depth)):
        if key in kwargs and int(kwargs[key]) != found:
            raise ModelFolderError(f"{source}: {part}_model_kwargs.{key}={kwargs[key]} but the weights have {found}")
    if "num_heads" in kwargs:
        return int(kwargs["num_heads"])
    table = timm_architecture(name)
    if table is None:
        raise ModelFolderError(f"{source}: unknown {part}_model {name!r} (known: {sorted(TIMM_ARCHITECTURES)}); "
                               f"set {part}_model_kwargs.num_heads")
    table_width, _, table_heads = table
    if table_width != width:
        raise ModelFolderError(f"{source}: {part}_model {name!r} has width {table_width} but the weights have {width}; "
                               f"set {part}_model_kwargs.num_heads")
    return table_heads


def authors_architecture(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: PathLike,
                         weights: PathLike) -> tuple[TokenizerConfig, ReleasedArchitecture]:
    """Our config of a checkpoint in their format, from its ``config.json`` (``config``, read from ``source``)
    and the tensor shapes of its weights (read from ``weights``): the weights decide widths, depths, patch size,
    latent size, MLP ratio and which optional parts exist; the config gives image sizes, heads and statistics."""
    for key in ("enc_type", "dec_type"):
        if config.get(key, "vit") != "vit":
            raise ModelFolderError(f"{source}: {key}={config[key]!r}; only their ViT tokenizers (enc_type/dec_type 'vit') load")
    if config.get("to_pixel", "linear") != "linear":
        raise ModelFolderError(f"{source}: to_pixel={config['to_pixel']!r}; only their 'linear' pixel head loads")
    for key, what in REQUIRED_KEYS.items():
        if key not in shapes:
            raise ModelFolderError(f"{weights} has no {key} ({what}): not the released MAETok architecture")
    width, in_channels, patch, _ = shapes["encoder.model.patch_embed.proj.weight"]
    dec_width = shapes["decoder.mask_token"][-1] if "decoder.mask_token" in shapes else width
    enc_depth = _block_count(shapes, "encoder.model.blocks.")
    dec_depth = _block_count(shapes, "decoder.model.blocks.")
    latent_dim = shapes["quant_conv.weight"][0] if "quant_conv.weight" in shapes else int(config["codebook_embed_dim"])
    num_latent = shapes["encoder.latent_tokens"][1] if "encoder.latent_tokens" in shapes else int(config["num_latent_tokens"])
    hidden = shapes.get("encoder.model.blocks.0.mlp.fc1.weight", (4 * width,))[0]
    image_size = int(config.get("image_size", 256))
    base_image_size = int(config.get("base_image_size", image_size))
    layer_scale = "encoder.model.blocks.0.ls1.gamma" in shapes
    tokenizer_config = TokenizerConfig(
        variant="maetok",
        image_size=image_size,
        in_channels=in_channels,
        patch_size=patch,
        encoder_width=width,
        encoder_depth=enc_depth,
        encoder_heads=_num_heads(config, "encoder", width, enc_depth, source),
        decoder_width=dec_width,
        decoder_depth=dec_depth,
        decoder_heads=_num_heads(config, "decoder", dec_width, dec_depth, source),
        mlp_ratio=hidden / width,
        num_latent_tokens=num_latent,
        latent_dim=latent_dim,
        rope_theta=float(config.get("rope_theta", 10.0)),
        layer_scale_init=LAYER_SCALE_INIT if layer_scale else 0.0,
        mask_ratio_min=0.0,  # loaded without the encoder's mask token: no masked training
        mask_ratio_max=0.0,
        aux_targets=[],
    )
    architecture = ReleasedArchitecture(
        encoder_cls_token="encoder.model.cls_token" in shapes,
        encoder_pos_embed="encoder.model.pos_embed" in shapes,
        rope_grid=base_image_size // patch,
        latent_mean=float(config.get("vq_mean", 0.0)),
        latent_std=float(config.get("vq_std", 1.0)),
    )
    return tokenizer_config, architecture


def authors_expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The key names (theirs) and shapes a checkpoint of ``model`` in their format holds, ignored keys aside."""
    return {to_authors_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def map_authors_state(state: Mapping[str, T]) -> tuple[dict[str, T], list[str]]:
    """``(our state, ignored keys)`` of a state in their naming (values: tensors, or shapes)."""
    mapped, ignored = {}, []
    for key, value in state.items():
        if is_ignored_key(key):
            ignored.append(key)
        else:
            mapped[to_our_key(key)] = value
    return mapped, ignored
