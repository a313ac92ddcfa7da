"""The MAETok tokenizer (paper §3): a ViT encoder with learnable 1D latent tokens, a ViT pixel decoder,
auxiliary shallow decoders, and the AE / VAE baselines from the same class.

Data flow (B images, N = (H/p)(W/p) patch tokens, L latent tokens, H_lat channels per latent token)::

    images (B, C, H, W) --patch embed--> x (B, N, D) --mask--> [x ; z + ape] (B, N+L, D)
        --encoder blocks (2D RoPE on the N image tokens)--> last L tokens --norm, linear--> latents (B, L, H_lat)
    latents --linear + ape--> [e ; h] (B, N+L, D) --decoder blocks (2D RoPE on e)--> first N tokens
        --norm, linear--> patches (B, N, p*p*C) --unpatchify--> images (B, C, H, W)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.config import TokenizerConfig, to_dict
from maetok.data.distribution import LatentDistribution
from maetok.global_batch import SampleRandom, require_draws
from maetok.models.blocks import (
    Block,
    PatchEmbed,
    Rope,
    as_parameter_dtype,
    init_vit_weights,
    rope_angles_2d,
    rope_from_angles,
    unpatchify,
)

def _grid_rope(grid: tuple[int, int], head_dim: int, theta: float, num_latent: int, device: torch.device) -> Rope:
    """RoPE (cos, sin) for ``[image tokens ; latent tokens]``: 2D on the grid, identity on latents."""
    cos, sin = rope_from_angles(rope_angles_2d(grid[0], grid[1], head_dim, theta), num_unrotated=num_latent)
    return cos.to(device), sin.to(device)


class ViTEncoder(nn.Module):
    """Patch tokens + learnable latent tokens through a ViT; returns the latent positions.

    ``forward(images (B, C, H, W), mask (B, N) bool or None) -> (B, L, out_dim)``.
    """

    def __init__(self, cfg: TokenizerConfig, out_dim: int):
        super().__init__()
        width = cfg.encoder_width
        self.num_latent_tokens = cfg.num_latent_tokens
        self.head_dim = width // cfg.encoder_heads
        self.rope_theta = cfg.rope_theta
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.latent_tokens = nn.Parameter(torch.zeros(cfg.num_latent_tokens, width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(cfg.num_latent_tokens, width))
        self.blocks = nn.ModuleList(
            Block(width, cfg.encoder_heads, cfg.mlp_ratio, layer_scale_init=cfg.layer_scale_init or None)
            for _ in range(cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(width)
        self.to_latent = nn.Linear(width, out_dim)
        self.apply(init_vit_weights)
        for p in (self.mask_token, self.latent_tokens, self.latent_pos_embed):
            nn.init.normal_(p, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        tokens = self.patch_embed(images)  # (B, N, D)
        grid = (images.shape[-2] // self.patch_embed.patch_size, images.shape[-1] // self.patch_embed.patch_size)
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        latent = (self.latent_tokens + self.latent_pos_embed).expand(tokens.shape[0], -1, -1)
        x = torch.cat([tokens, latent.to(tokens.dtype)], dim=1)  # (B, N + L, D)
        rope = _grid_rope(grid, self.head_dim, self.rope_theta, self.num_latent_tokens, x.device)
        for block in self.blocks:
            x = block(x, rope)
        return self.to_latent(self.norm(x[:, -self.num_latent_tokens :]))


class ViTDecoder(nn.Module):
    """Learnable image query tokens + projected latents through a ViT; returns one vector per query.

    Used for the pixel decoder (``out_dim = p * p * C``) and for the auxiliary decoders (``out_dim = D^j``).
    The N query tokens are learned on the training grid and bicubically resampled for other grids.
    ``forward(latents (B, L, H_lat), grid (gh, gw)) -> (B, gh * gw, out_dim)``.

    1D-query mode (``num_queries`` set, e.g. the caption decoder): ``num_queries`` learnable query tokens with a
    learned 1D position embedding and no RoPE; ``grid`` is ignored and the output is ``(B, num_queries, out_dim)``.
    """

    def __init__(
        self,
        cfg: TokenizerConfig,
        width: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        num_queries: Optional[int] = None,
    ):
        super().__init__()
        self.num_latent_tokens = cfg.num_latent_tokens
        self.head_dim = width // num_heads
        self.rope_theta = cfg.rope_theta
        self.train_grid = cfg.grid_size
        self.num_queries = num_queries
        num_query_tokens = num_queries if num_queries is not None else self.train_grid[0] * self.train_grid[1]
        self.query_tokens = nn.Parameter(torch.zeros(num_query_tokens, width))
        if num_queries is not None:
            self.query_pos_embed = nn.Parameter(torch.zeros(num_queries, width))
        self.latent_proj = nn.Linear(cfg.latent_dim, width)
        self.latent_pos_embed = nn.Parameter(torch.zeros(cfg.num_latent_tokens, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, cfg.mlp_ratio, layer_scale_init=cfg.layer_scale_init or None)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        nn.init.normal_(self.latent_pos_embed, std=0.02)
        if num_queries is not None:
            nn.init.normal_(self.query_pos_embed, std=0.02)

    def queries(self, grid: tuple[int, int]) -> Tensor:
        """Query tokens ``(gh * gw, D)`` for a grid, resampled from the training grid if needed."""
        if tuple(grid) == tuple(self.train_grid):
            return self.query_tokens
        q = self.query_tokens.T.reshape(1, -1, *self.train_grid)
        q = F.interpolate(q, size=grid, mode="bicubic", align_corners=False)
        return q.reshape(q.shape[1], -1).T

    def forward(self, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        b = latents.shape[0]
        latent = self.latent_proj(latents) + self.latent_pos_embed
        if self.num_queries is not None:  # 1D queries: learned positions, no RoPE
            queries = (self.query_tokens + self.query_pos_embed).expand(b, -1, -1).to(latent.dtype)
            num_out, rope = self.num_queries, None
        else:
            queries = self.queries(grid).expand(b, -1, -1).to(latent.dtype)
            num_out = grid[0] * grid[1]
            rope = _grid_rope(grid, self.head_dim, self.rope_theta, self.num_latent_tokens, latent.device)
        x = torch.cat([queries, latent], dim=1)  # (B, Q + L, D)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x[:, :num_out]))


@dataclass
class TokenizerOutput:
    """What one training forward pass produces."""

    reconstruction: Tensor  # (B, C, H, W)
    grid: tuple[int, int]  # patch grid (gh, gw) of the images
    latents: Tensor  # (B, L, H_lat), the sample for a VAE
    mask: Optional[Tensor]  # (B, N) bool, True = masked; None when nothing was masked
    aux_predictions: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, N, D^j); text: (B, T, vocab)
    posterior_mean: Optional[Tensor] = None  # VAE only, (B, L, H_lat)
    posterior_logvar: Optional[Tensor] = None  # VAE only


MaskRatio = Union[float, tuple[float, float], Tensor]
#: the scalar latent statistics a tokenizer carries, as attributes and as ``config.json`` entries (ours); diffusion
#: models train on ``(latents - latent_mean) / latent_std`` (diffusers: ``shift_factor`` and ``1 / scaling_factor``)
LATENT_STATISTICS = ("latent_mean", "latent_std")


class MAETok(nn.Module):
    """MAETok / AE / VAE tokenizer. Input images are ``(B, C, H, W)`` in [-1, 1]; latents ``(B, L, H_lat)``; decoded
    images are the decoder's raw output, near [-1, 1] but not clamped (:meth:`decode`).

    ``aux_dims`` maps auxiliary-target names to their feature sizes; auxiliary decoders are built only for
    training and are never part of :meth:`save_pretrained`. ``aux_query_lengths`` maps the names of sequence
    targets (the caption target) to their number of 1D query tokens; their decoders output
    ``(B, length, dim)`` logits instead of ``(B, N, dim)`` patch features.

    ``latent_mean`` / ``latent_std``: the scalar latent statistics the model folder carries (the authors' released
    tokenizer: their ``vq_mean`` / ``vq_std``, see :mod:`maetok.models.released`; ours: measured by the trainer when
    it writes the model folder, :func:`maetok.encode.latent_statistics`); ``None`` when never measured.
    ``cache-latents`` measures the scalar and per-channel statistics of a dataset (the cache's ``stats.json``).
    """

    latent_mean: Optional[float] = None
    latent_std: Optional[float] = None

    def __init__(
        self,
        config: TokenizerConfig,
        aux_dims: Optional[dict[str, int]] = None,
        aux_query_lengths: Optional[dict[str, int]] = None,
    ):
        super().__init__()
        config.validate()
        self.config = config
        is_vae = config.variant == "vae"
        self.encoder = ViTEncoder(config, out_dim=2 * config.latent_dim if is_vae else config.latent_dim)
        self.decoder = ViTDecoder(
            config,
            config.decoder_width,
            config.decoder_depth,
            config.decoder_heads,
            out_dim=config.patch_size**2 * config.in_channels,
        )
        self.aux_decoders = nn.ModuleDict()
        for name, dim in (aux_dims or {}).items():
            self.aux_decoders[name] = ViTDecoder(
                config,
                config.aux_width or config.decoder_width,
                config.aux_depth,
                config.aux_heads or config.decoder_heads,
                out_dim=dim,
                num_queries=(aux_query_lengths or {}).get(name),
            )

    # -- geometry ----------------------------------------------------------------------------------------

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}")
        return images.shape[-2] // p, images.shape[-1] // p

    @staticmethod
    def random_mask(
        batch_size: int,
        num_tokens: int,
        ratio: MaskRatio,
        draws: Optional[SampleRandom] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """Boolean mask ``(B, N)``, True = masked. ``ratio``: a float, a ``(min, max)`` range drawn uniformly
        per image, or a ``(B,)`` tensor of per-image ratios. Each image gets ``round(r * N)`` masked tokens
        chosen uniformly at random. ``draws``: the batch's :class:`~maetok.global_batch.SampleRandom` (required;
        streams ``mask_ratio`` and ``mask_order`` of each image, made on ``device``, where the mask is)."""
        draws = require_draws(draws, batch_size, "MAETok.random_mask")
        if isinstance(ratio, tuple):
            ratio = ratio[0] + (ratio[1] - ratio[0]) * draws.uniform("mask_ratio", (), device).double()
        order = draws.bits("mask_order", (num_tokens,), device)
        ratios = torch.as_tensor(ratio, dtype=torch.float64).to(order.device).expand(batch_size)
        num_masked = torch.round(ratios * num_tokens).long()
        ranks = order.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        return ranks < num_masked[:, None]

    # -- encode / decode ---------------------------------------------------------------------------------

    def encode_posterior(self, images: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Encoder output: ``(mean, logvar)`` for a VAE, ``(latents, None)`` otherwise; each ``(B, L, H_lat)`` in the
        model's dtype (``images`` are cast to it)."""
        self.grid_size(images)
        out = self.encoder(as_parameter_dtype(self, images), mask)
        if self.config.variant != "vae":
            return out, None
        mean, logvar = out.chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: Tensor, sample: bool = False, draws: Optional[SampleRandom] = None) -> Tensor:
        """images ``(B, C, H, W)`` in [-1, 1] -> latents ``(B, L, H_lat)``. A VAE returns its posterior mean
        unless ``sample`` (noise from ``draws``, see :meth:`sample_posterior`)."""
        mean, logvar = self.encode_posterior(images)
        if logvar is None or not sample:
            return mean
        return self.sample_posterior(mean, logvar, draws)

    def encode_distribution(self, images: Tensor) -> LatentDistribution:
        """images ``(B, C, H, W)`` in [-1, 1] -> the :class:`LatentDistribution` of their latents ``(B, L, H_lat)``
        (a VAE's posterior; a point mass for AE / MAETok), as diffusers' ``encode(x).latent_dist``."""
        return LatentDistribution(*self.encode_posterior(images))

    @staticmethod
    def sample_posterior(mean: Tensor, logvar: Tensor, draws: Optional[SampleRandom] = None) -> Tensor:
        """``mean + exp(logvar / 2) * noise``, each ``(B, L, H_lat)``; the noise of each image comes from its
        stream ``posterior`` of ``draws`` (the batch's :class:`~maetok.global_batch.SampleRandom`, required),
        drawn on the device."""
        draws = require_draws(draws, mean.shape[0], "MAETok.sample_posterior")
        noise = draws.normal("posterior", mean.shape[1:], mean.device, mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def decode(self, latents: Tensor, image_size: Optional[tuple[int, int]] = None) -> Tensor:
        """latents ``(B, L, H_lat)`` -> images ``(B, C, H, W)`` in the model's dtype (``latents`` are cast to it): the
        decoder's raw output, not clamped (as diffusers' ``decode``), so values can leave [-1, 1] a little (a trained
        decoder's reach e.g. -1.1). Everything that makes images of it clamps: :func:`maetok.data.images.to_uint8`
        (PNGs, grids, samples, every metric), :func:`~maetok.encode.reconstruct_images`;
        clamp it yourself before any other use as pixels."""
        cfg = self.config
        if latents.dim() != 3 or latents.shape[1:] != (cfg.num_latent_tokens, cfg.latent_dim):
            raise ValueError(
                f"expected latents (B, {cfg.num_latent_tokens}, {cfg.latent_dim}), got {tuple(latents.shape)}"
            )
        h, w = image_size or (cfg.image_size, cfg.image_size)
        grid = (h // cfg.patch_size, w // cfg.patch_size)
        patches = self.decoder(as_parameter_dtype(self, latents), grid)
        return unpatchify(patches, cfg.patch_size, grid[0], grid[1], cfg.in_channels)

    def forward(
        self,
        images: Tensor,
        mask_ratio: Optional[MaskRatio] = None,
        draws: Optional[SampleRandom] = None,
    ) -> TokenizerOutput:
        """Training pass: mask (if ``mask_ratio``), encode, decode, run the auxiliary decoders.

        ``draws``: the batch's :class:`~maetok.global_batch.SampleRandom` (the trainers': keyed by each image's
        place in the global batch), required when the pass draws (masking, a VAE's posterior sample). The
        mask is returned even when it masks nothing, so that the mask token takes part in every step (DDP
        needs every trainable parameter in the graph)."""
        grid = self.grid_size(images)
        mask = None
        if mask_ratio is not None:
            mask = self.random_mask(images.shape[0], grid[0] * grid[1], mask_ratio, draws, images.device)
        mean, logvar = self.encode_posterior(images, mask)
        latents = mean if logvar is None else self.sample_posterior(mean, logvar, draws)
        patches = self.decoder(latents, grid)
        reconstruction = unpatchify(patches, self.config.patch_size, grid[0], grid[1], self.config.in_channels)
        aux = {name: decoder(latents, grid) for name, decoder in self.aux_decoders.items()}
        return TokenizerOutput(
            reconstruction=reconstruction,
            grid=grid,
            latents=latents,
            mask=mask,
            aux_predictions=aux,
            posterior_mean=mean if logvar is not None else None,
            posterior_logvar=logvar,
        )

    def unused_in_training(self) -> list[str]:
        """Names of the parameters no training step of this config uses: the mask token when the config never
        masks (``mask_ratio_max == 0``: the AE and VAE baselines). It stays in the state dict (model folders and
        checkpoints keep their keys) and in the optimizer, where it never gets a gradient; multi-process
        training tells DDP to leave it out of its gradient reduction."""
        return ["encoder.mask_token"] if self.config.mask_ratio_max <= 0 else []

    def last_decoder_layer(self) -> Tensor:
        """The pixel head's weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.head.weight

    # -- parameters --------------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        counts = {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
        }
        for name, module in self.aux_decoders.items():
            counts[f"aux.{name}"] = sum(p.numel() for p in module.parameters())
        counts["tokenizer (encoder + decoder)"] = counts["encoder"] + counts["decoder"]
        return counts

    def inference_state_dict(self) -> dict[str, Tensor]:
        """Encoder + pixel decoder weights (no auxiliary decoders)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("aux_decoders.")}

    # -- persistence -------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        """What ``config.json`` holds (besides ``model_type`` and the format version): the config, and the scalar
        latent statistics (:data:`LATENT_STATISTICS`) once measured."""
        measured = self.latent_mean is not None and self.latent_std is not None
        return {**to_dict(self.config), **({name: getattr(self, name) for name in LATENT_STATISTICS} if measured else {})}

    def untrained_copy(self) -> "MAETok":
        """A freshly initialised tokenizer of the same architecture, without auxiliary decoders."""
        return MAETok(self.config)

    # model folders (maetok.model_folders: the one place that reads and writes them) ----------------------

    def save_pretrained(self, directory: Union[str, Path], state_dict: Optional[dict[str, Tensor]] = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (encoder + pixel decoder), atomically
        (:func:`maetok.model_folders.save_tokenizer`)."""
        from maetok.model_folders import save_tokenizer

        return save_tokenizer(self, directory, state_dict)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: Optional[str] = None) -> str:
        """Upload :meth:`save_pretrained`'s folder and a model card to the Hugging Face hub repo ``repo_id`` (created
        if needed; :func:`maetok.model_folders.push_to_hub`); returns the commit URL."""
        from maetok.model_folders import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, source: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
                        torch_dtype: Optional[Union[str, torch.dtype]] = None) -> "MAETok":
        """Load a tokenizer: a folder written by :meth:`save_pretrained`, by the authors' saver or by diffusers
        (``MAETokAutoencoder``; detected from its ``config.json``), the run directory holding one as ``model/``, or a
        Hugging Face hub id (through the hub cache; ``HF_HUB_OFFLINE=1`` never downloads). Strict: every key and
        shape must match. Safetensors only: no code is executed. In eval mode on ``device`` (default the CPU) in
        ``torch_dtype`` (default float32). See :func:`maetok.model_folders.load_tokenizer`."""
        from maetok.model_folders import load_tokenizer

        return load_tokenizer(source, device, torch_dtype)
