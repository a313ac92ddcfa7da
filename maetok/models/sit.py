"""SiT (Scalable Interpolant Transformer) on the 1D MAETok latents, plus the adaLN-Zero machinery it shares
with LightningDiT (:mod:`maetok.models.lightningdit`).

The model predicts the velocity of the linear interpolant ``x_t = (1 - t) x_0 + t eps`` (``t = 0``: data,
``t = 1``: noise; see :mod:`maetok.diffusion.transport`):

* input ``x``: ``(B, L, C)`` latent tokens (paper: L=128 tokens of C=32 channels, normalised to zero mean
  and unit std); patch size 1, so every latent token is one transformer token (``x_embedder`` is a
  ``Linear(C, width)``);
* ``t``: ``(B,)`` float times in ``[0, 1]`` (fed to the sinusoidal time embedding without rescaling);
* ``y``: ``(B,)`` int64 class labels in ``[0, num_classes)``; the index ``num_classes`` is the null
  (unconditional) class used for classifier-free guidance;
* output: ``(B, L, C)`` velocity.

The parameter and buffer names/shapes equal the authors' released SiT-XL on 1D latents
(``shared/compat/sit-xl-maetok.json``), so that checkpoint loads with ``load_state_dict`` directly:
``pos_embed`` (fixed sin-cos, interleaved sin/cos channels, stored in the state dict but not trained),
``x_embedder``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.N.{attn.qkv, attn.proj,
mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``final_layer.{linear, adaLN_modulation.1}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from maetok.config import DiffusionModelConfig
from maetok.global_batch import SampleRandom, require_draws
from maetok.models.blocks import (Attention, Mlp, Rope, SwiGLU, as_parameter_dtype, make_norm, modulate, sincos_1d,
                                  timestep_embedding)

__all__ = [
    "SiT",
    "AdaLNVelocityTransformer",
    "TimestepEmbedder",
    "LabelEmbedder",
    "AdaLNBlock",
    "FinalLayer",
    "apply_guidance",
    "build_diffusion_model",
    "sincos_1d_interleaved",
]

# ---------------------------------------------------------------------------------------------------------
# Shared pieces (also used by LightningDiT)
# ---------------------------------------------------------------------------------------------------------


def sincos_1d_interleaved(num_positions: int, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed 1D sin-cos position embedding ``(T, dim)`` with interleaved channels: ``[sin f0, cos f0, sin f1,
    cos f1, ...]`` with ``f_i = max_period ** (-2i / dim)`` (the layout stored in the authors' SiT checkpoint)."""
    halves = sincos_1d(num_positions, dim, max_period)  # (T, dim): [sin | cos], same frequencies
    half = dim // 2
    return torch.stack([halves[:, :half], halves[:, half:]], dim=-1).flatten(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``t`` (``frequency_dim`` channels, ``[cos, sin]``) followed by an MLP
    ``Linear -> SiLU -> Linear``. ``(B,)`` -> ``(B, width)``."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        frequencies = timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(frequencies)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0`` (row ``num_classes`` is the null
    class), else ``num_classes`` rows (as in the authors' code; such a model cannot be guided).
    """

    def __init__(self, num_classes: int, width: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), width)

    def drop_labels(
        self,
        labels: Tensor,
        force_drop_ids: Optional[Tensor] = None,
        draws: Optional[SampleRandom] = None,
    ) -> Tensor:
        """Replace labels ``(B,)`` by the null class: where ``force_drop_ids`` ``(B,)`` is nonzero if given, else
        with probability ``dropout_prob`` from each sample's stream ``label_drop`` of ``draws`` (the batch's
        :class:`~maetok.global_batch.SampleRandom`, then required)."""
        if force_drop_ids is None:
            draws = require_draws(draws, labels.shape[0], "SiT label dropout (training mode; or pass force_drop_ids, "
                                  "as training_loss does with label_dropout=class_dropout_prob)")
            drop = draws.uniform("label_drop", (), labels.device) < self.dropout_prob
        else:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(
                    f"force_drop_ids must have the labels' shape {tuple(labels.shape)}, "
                    f"got {tuple(force_drop_ids.shape)}"
                )
            drop = force_drop_ids.to(labels.device) != 0
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self,
        labels: Tensor,
        train: bool,
        force_drop_ids: Optional[Tensor] = None,
        draws: Optional[SampleRandom] = None,
    ) -> Tensor:
        """labels: ``(B,)`` int in ``[0, num_classes]`` (``num_classes`` = null) -> ``(B, width)``."""
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            if not self.has_null_class:
                raise ValueError("this model was built with class_dropout_prob=0 and has no null class to drop to")
            labels = self.drop_labels(labels, force_drop_ids, draws)
        return self.embedding_table(labels)


class AdaLNBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT): the conditioning vector ``c`` (B, D) gives a
    shift, scale and gate for the attention and MLP branches; the gates start at zero.

    ``norm="layernorm"`` is a LayerNorm without affine parameters (SiT); ``"rmsnorm"`` has a learnable scale
    (LightningDiT). ``mlp="gelu"`` is a tanh-GELU MLP of ``mlp_ratio * width``; ``"swiglu"`` a SwiGLU with
    ``int(2/3 * mlp_ratio * width)`` hidden units (same parameter budget).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
    ):
        super().__init__()
        affine = norm != "layernorm"
        self.norm1 = make_norm(norm, width, affine=affine)
        self.attn = Attention(width, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, width, affine=affine)
        hidden = int(width * mlp_ratio)
        if mlp == "gelu":
            self.mlp: nn.Module = Mlp(width, hidden, approximate_gelu=True)
        elif mlp == "swiglu":
            self.mlp = SwiGLU(width, int(2 / 3 * hidden))
        else:
            raise ValueError(f"unknown mlp {mlp!r}; expected 'gelu' or 'swiglu'")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, rope: Optional[Rope] = None) -> Tensor:
        """x: ``(B, T, D)``, c: ``(B, D)`` -> ``(B, T, D)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear head ``width -> out_channels`` (zero-initialised by the model)."""

    def __init__(self, width: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, width, affine=norm != "layernorm")
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def apply_guidance(
    cond: Tensor,
    uncond: Tensor,
    t: Tensor,
    cfg_scale: float,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> Tensor:
    """Classifier-free guidance with a guidance interval, per sample.

    cond, uncond: ``(B, ...)`` conditional / unconditional outputs; t: ``(B,)``. Returns
    ``uncond + cfg_scale * (cond - uncond)`` for the samples whose ``t`` lies in ``[low, high]`` (inclusive)
    and ``cond`` for the others.
    """
    low, high = _check_interval(guidance_interval)
    inside = (t >= low) & (t <= high)
    guided = uncond + cfg_scale * (cond - uncond)
    inside = inside.view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(inside, guided, cond)


def _check_interval(guidance_interval: Sequence[float]) -> tuple[float, float]:
    if len(guidance_interval) != 2:
        raise ValueError(f"guidance_interval must be (low, high), got {guidance_interval!r}")
    low, high = float(guidance_interval[0]), float(guidance_interval[1])
    if low > high:
        raise ValueError(f"guidance_interval low {low} is above high {high}")
    return low, high


# ---------------------------------------------------------------------------------------------------------
# The shared velocity transformer
# ---------------------------------------------------------------------------------------------------------


class AdaLNVelocityTransformer(nn.Module):
    """Base of SiT and LightningDiT: embedders, adaLN-Zero blocks, final layer, initialisation,
    ``forward`` and ``forward_with_cfg``. A subclass names its block design (``block_norm``, ``block_mlp``)
    and adds its position handling: :meth:`_build_positions` (buffers, called between the embedders and
    the blocks), :meth:`_position_inputs` (absolute embedding) and/or :meth:`_rope` (rotary embedding).
    """

    block_norm: ClassVar[str] = "layernorm"  # "layernorm" or "rmsnorm", see AdaLNBlock
    block_mlp: ClassVar[str] = "gelu"  # "gelu" or "swiglu", see AdaLNBlock

    def __init__(self, config: DiffusionModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.width = config.width
        self.latent_dim = config.latent_dim
        self.num_latent_tokens = config.num_latent_tokens
        self.num_classes = config.num_classes if config.conditional else 0  # 0: unconditional, no label embedding
        self.x_embedder = nn.Linear(config.latent_dim, config.width)
        self.t_embedder = TimestepEmbedder(config.width, config.frequency_dim)
        self.y_embedder: Optional[LabelEmbedder] = None
        if self.num_classes > 0:
            self.y_embedder = LabelEmbedder(self.num_classes, config.width, config.class_dropout_prob)
        self._build_positions(config)
        self.blocks = nn.ModuleList(
            AdaLNBlock(config.width, config.num_heads, config.mlp_ratio, self.block_norm, self.block_mlp,
                       config.qk_norm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.width, config.latent_dim, self.block_norm)
        self.initialize_weights()
        # the diffusion folder's other entries when loaded by from_pretrained (see save_pretrained)
        self.folder_extras: dict[str, Any] = {}

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias; N(0, 0.02) label table and time-MLP weights; zero adaLN
        modulation and zero final linear (adaLN-Zero: a fresh model outputs exactly zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # hooks -------------------------------------------------------------------------------------------

    def _build_positions(self, config: DiffusionModelConfig) -> None:
        """Register the position buffers (none here)."""

    def _position_inputs(self, tokens: Tensor) -> Tensor:
        """tokens: ``(B, L, width)`` -> ``(B, L, width)`` (unchanged here)."""
        return tokens

    def _rope(self) -> Optional[Rope]:
        return None

    # checks ------------------------------------------------------------------------------------------

    @property
    def has_null_class(self) -> bool:
        return self.y_embedder is not None and self.y_embedder.has_null_class

    def _check_inputs(self, x: Tensor, t: Tensor | float, y: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        name = type(self).__name__
        if x.dim() != 3 or x.shape[1] != self.num_latent_tokens or x.shape[2] != self.latent_dim:
            raise ValueError(
                f"{name} expects x of shape (B, {self.num_latent_tokens}, {self.latent_dim}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{name} expects t of shape ({batch},) or a scalar, got {tuple(t.shape)}")
        if self.y_embedder is None:
            return t, None
        if y is None:
            if not self.y_embedder.has_null_class:
                raise ValueError(f"{name} is class-conditional without a null class: y is required")
            return t, torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        if y.shape != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{name} expects y as ({batch},) integer class labels, got {tuple(y.shape)} {y.dtype}")
        top = self.num_classes if self.y_embedder.has_null_class else self.num_classes - 1
        checking = batch > 0 and not torch.compiler.is_compiling()  # the range check syncs with the device
        if checking and (bool((y < 0).any()) or bool((y > top).any())):
            raise ValueError(
                f"{name} class labels must lie in [0, {top}] ({self.num_classes} classes"
                f"{', index ' + str(self.num_classes) + ' = null' if top == self.num_classes else ''}); "
                f"got min {int(y.min())} max {int(y.max())}"
            )
        return t, y.to(device=x.device, dtype=torch.long)

    # forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Optional[Tensor] = None,
        force_drop_ids: Optional[Tensor] = None,
        draws: Optional[SampleRandom] = None,
    ) -> Tensor:
        """Velocity prediction.

        x: ``(B, L, C)`` noisy latents; t: ``(B,)`` (or a scalar) times in ``[0, 1]``; y: ``(B,)`` int64 labels
        (``num_classes`` = null class; ``None`` means all-null for a conditional model; ignored when
        ``num_classes == 0``). In training mode labels are dropped to the null class with probability
        ``class_dropout_prob``, drawn from ``draws`` (the batch's :class:`~maetok.global_batch.SampleRandom`);
        ``force_drop_ids`` ``(B,)`` (nonzero = drop) replaces that draw in any mode (the trainer's
        :func:`~maetok.diffusion.transport.training_loss` passes them). Returns the velocity ``(B, L, C)``.
        """
        t, y = self._check_inputs(x, t, y)
        tokens = self._position_inputs(self.x_embedder(as_parameter_dtype(self, x)))
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids=force_drop_ids, draws=draws)
        rope = self._rope()
        for block in self.blocks:
            tokens = block(tokens, c, rope)
        return self.final_layer(tokens, c)

    def forward_pair(self, x: Tensor, t: Tensor | float, y: Tensor) -> tuple[Tensor, Tensor]:
        """The conditional and the unconditional (null-class) velocities ``(B, L, C)`` each, in one batch of
        ``2B`` (no label dropout). Raises ``ValueError`` for a model without a null class."""
        t, y = self._check_inputs(x, t, y)
        if self.y_embedder is None or not self.y_embedder.has_null_class or y is None:
            raise ValueError(f"{type(self).__name__} has no null class (num_classes=0 or class_dropout_prob=0): "
                             "no unconditional velocity for classifier-free guidance")
        keep = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        drop = torch.cat([keep, torch.ones_like(keep)])
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop_ids=drop)
        cond, uncond = both.chunk(2)
        return cond, uncond

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor,
        cfg_scale: float,
        guidance_interval: Sequence[float] = (0.0, 1.0),
    ) -> Tensor:
        """Classifier-free guided velocity ``(B, L, C)``.

        Runs the conditional and the unconditional (null-class) pass in one batch of ``2B``
        (:meth:`forward_pair`) and returns ``u + cfg_scale * (c - u)`` for samples with ``t`` in
        ``guidance_interval = (low, high)`` (inclusive), the conditional velocity ``c`` for the others. Label
        dropout is never applied here. ``cfg_scale == 1`` or no sample inside the interval skips the
        unconditional pass.
        """
        _check_interval(guidance_interval)
        t, y = self._check_inputs(x, t, y)
        if self.y_embedder is None or y is None:
            if cfg_scale != 1.0:
                raise ValueError(f"{type(self).__name__} is unconditional (num_classes=0): cfg_scale must be 1")
            return self.forward(x, t, y)
        low, high = float(guidance_interval[0]), float(guidance_interval[1])
        if cfg_scale == 1.0 or not bool(((t >= low) & (t <= high)).any()):
            return self.forward(x, t, y, force_drop_ids=torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        if not self.y_embedder.has_null_class:
            raise ValueError(f"{type(self).__name__} was built with class_dropout_prob=0: no null class for CFG")
        cond, uncond = self.forward_pair(x, t, y)
        return apply_guidance(cond, uncond, t, cfg_scale, guidance_interval)

    # model folders (maetok.model_folders: the one place that reads and writes them) ----------------------

    @classmethod
    def from_pretrained(
        cls, source: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
        torch_dtype: Optional[Union[str, torch.dtype]] = None,
    ) -> "AdaLNVelocityTransformer":
        """The model in ``source`` (our diffusion folder, its run directory, the authors' released SiT folder, a
        diffusers ``MAETokTransformer`` folder or a hub id; :func:`maetok.model_folders.load_diffusion_model`), in eval
        mode on ``device`` (default the CPU) in ``torch_dtype`` (default float32). The folder's
        other entries (latent normalisation, sampling defaults, tokenizer, class names) are kept in
        :attr:`folder_extras` and written back by :meth:`save_pretrained`."""
        from maetok.model_folders import load_diffusion_model

        model, folder = load_diffusion_model(source, device, torch_dtype)
        if not isinstance(model, cls):
            raise ValueError(f"{folder.directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def save_pretrained(self, directory: Union[str, Path], state_dict: Optional[dict[str, Tensor]] = None,
                        **extras: Any) -> Path:
        """Our diffusion model folder (:func:`maetok.model_folders.save_diffusion_model`); ``extras`` (``class_names``,
        ``latent_norm``, ``sampling``, ``tokenizer``) override :attr:`folder_extras`."""
        from maetok.model_folders import save_diffusion_model

        return save_diffusion_model(self, directory, state_dict, **{**self.folder_extras, **extras})

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: Optional[str] = None) -> str:
        """:meth:`save_pretrained`'s folder uploaded to the hub repository ``repo_id``
        (:func:`maetok.model_folders.push_to_hub`); returns the commit URL."""
        from maetok.model_folders import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message)


# ---------------------------------------------------------------------------------------------------------
# SiT
# ---------------------------------------------------------------------------------------------------------


class SiT(AdaLNVelocityTransformer):
    """SiT with patch size 1 on ``(B, L, C)`` latents, fixed 1D sin-cos absolute position embedding,
    adaLN-Zero class/time conditioning; predicts the velocity ``(B, L, C)``. See the module docstring."""

    block_norm = "layernorm"
    block_mlp = "gelu"

    def _build_positions(self, config: DiffusionModelConfig) -> None:
        if config.pos_embed_layout == "interleaved":
            pos = sincos_1d_interleaved(config.num_latent_tokens, config.width)
        else:
            pos = sincos_1d(config.num_latent_tokens, config.width)
        # (1, L, width); stored in the state dict (the reference checkpoint has it) but never trained
        self.register_buffer("pos_embed", pos[None], persistent=True)

    def _position_inputs(self, tokens: Tensor) -> Tensor:
        return tokens + self.pos_embed.to(tokens.dtype)


def build_diffusion_model(config: DiffusionModelConfig) -> AdaLNVelocityTransformer:
    """The :class:`SiT` or :class:`~maetok.models.lightningdit.LightningDiT` of ``config.arch``: the one builder.
    The model maps latents ``(B, L, C)`` to velocities ``(B, L, C)``."""
    from maetok.models.lightningdit import LightningDiT

    config.validate()  # an unknown arch: ConfigError naming it
    return (LightningDiT if config.arch == "lightningdit" else SiT)(config)
