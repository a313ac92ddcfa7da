"""Transformer building blocks shared by the tokenizer, the diffusion models and the checkpoint loaders.

Everything here works on token sequences ``(B, T, D)``. Rotary position embeddings are passed to attention
as a precomputed ``(cos, sin)`` pair of shape ``(T, head_dim)`` (or ``(H, T, head_dim)`` for per-head
frequencies); tokens that should not be rotated (the latent tokens of the tokenizer) get ``cos = 1`` and
``sin = 0``, so one fused elementwise op covers the whole sequence and attention stays on
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------------


def rope_frequencies(dim: int, theta: float) -> Tensor:
    """Inverse frequencies ``theta ** (-2i / dim)`` for ``i < dim // 2``; shape ``(dim // 2,)``."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_angles_1d(positions: Tensor, dim: int, theta: float = 10000.0) -> Tensor:
    """Angles for 1D RoPE. positions: ``(T,)`` -> ``(T, dim // 2)`` (float64)."""
    return positions.to(torch.float64)[:, None] * rope_frequencies(dim, theta)[None, :]


def rope_angles_2d(grid_h: int, grid_w: int, dim: int, theta: float = 100.0) -> Tensor:
    """Axial 2D RoPE angles for a ``grid_h x grid_w`` patch grid in row-major order.

    The first half of the rotated pairs encodes the row, the second half the column.
    Returns ``(grid_h * grid_w, dim // 2)`` (float64).
    """
    if dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([rope_angles_1d(rows, dim // 2, theta), rope_angles_1d(cols, dim // 2, theta)], dim=-1)


def rope_from_angles(angles: Tensor, num_unrotated: int = 0, unrotated_first: bool = False) -> Rope:
    """Turn ``(..., T, dim/2)`` angles into ``(cos, sin)`` of shape ``(..., T + num_unrotated, dim)``.

    ``num_unrotated`` identity positions (cos=1, sin=0) are appended (or prepended) for tokens that carry
    no rotary position, e.g. the latent tokens of the tokenizer.
    """
    angles = torch.repeat_interleave(angles, 2, dim=-1)  # pairs (2i, 2i+1) share an angle
    rope = angles.cos(), angles.sin()
    before, after = (num_unrotated, 0) if unrotated_first else (0, num_unrotated)
    cos, sin = pad_rope(rope, before, after)
    return cos.float(), sin.float()


def pad_rope(rope: Rope, num_before: int, num_after: int) -> Rope:
    """``(cos, sin)`` of shape ``(..., T, dim)`` with identity positions (cos=1, sin=0) added before and after
    the ``T`` rotated ones along the token axis: ``(..., num_before + T + num_after, dim)``."""
    cos, sin = rope
    if not num_before and not num_after:
        return cos, sin

    def pad(x: Tensor, fill: float) -> Tensor:
        parts = [x.new_full((*x.shape[:-2], n, x.shape[-1]), fill) for n in (num_before, num_after)]
        return torch.cat([parts[0], x, parts[1]], dim=-2)

    return pad(cos, 1.0), pad(sin, 0.0)


def rope_grid_positions(grid_w: int, grid_h: int) -> tuple[Tensor, Tensor]:
    """Column and row index ``(x, y)`` of every patch of a ``grid_h x grid_w`` grid in row-major order, float32
    ``(grid_h * grid_w,)`` each."""
    t = torch.arange(grid_w * grid_h, dtype=torch.float32)
    return t % grid_w, torch.div(t, grid_w, rounding_mode="floor")


def mixed_rope(freqs: Tensor, pos_x: Tensor, pos_y: Tensor, num_heads: int, num_before: int = 0,
               num_after: int = 0) -> list[Rope]:
    """"RoPE-mixed" (Heo et al. 2024): learnable 2D frequencies per layer and head. The angle of rotated pair
    ``i`` of head ``h`` at a patch ``(x, y)`` is ``x * freqs[0, layer, h, i] + y * freqs[1, layer, h, i]``.

    freqs: ``(2, depth, num_heads * head_dim / 2)``; pos_x / pos_y: ``(N,)``. Returns one ``(cos, sin)`` per
    layer, each ``(num_heads, num_before + N + num_after, head_dim)``, identity on the ``num_before`` /
    ``num_after`` unrotated tokens around the N rotated ones. Differentiable in ``freqs`` (float32).
    """
    depth = freqs.shape[1]
    freqs = freqs.float()
    angles = pos_x.float()[:, None] * freqs[0][:, None, :] + pos_y.float()[:, None] * freqs[1][:, None, :]
    angles = angles.view(depth, pos_x.shape[0], num_heads, -1).permute(0, 2, 1, 3)  # (depth, H, N, head_dim/2)
    angles = torch.repeat_interleave(angles, 2, dim=-1)
    return [pad_rope((a.cos(), a.sin()), num_before, num_after) for a in angles]


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate interleaved pairs of the last dim. x: ``(B, heads, T, dim)``; cos/sin broadcast to it."""
    cos, sin = rope
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-x_pairs[..., 1], x_pairs[..., 0]], dim=-1).flatten(-2)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # same dtype: the fused path


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` with optional RoPE and qk-norm."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Optional[Rope] = None) -> Tensor:
        """x: ``(B, T, D)`` -> ``(B, T, D)``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int, approximate_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(w1 x) * w2 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x)); x + mlp(norm(x))``, optional LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm: str = "layernorm",
        layer_scale_init: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()

    def forward(self, x: Tensor, rope: Optional[Rope] = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale broadcast over tokens: ``(B, D)`` or ``(B, T, D)``."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. ``(B, C, H, W)`` -> ``(B, (H/p)*(W/p), D)`` in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        p = self.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}")
        return self.proj(images).flatten(2).transpose(1, 2)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)`` with per-patch layout ``(p, p, C)``, row-major patches."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_h: int, grid_w: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C)`` -> ``(B, C, grid_h*p, grid_w*p)``."""
    b = patches.shape[0]
    p = patch_size
    x = patches.reshape(b, grid_h, grid_w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid_h * p, grid_w * p)


def sincos_1d(num_positions: int, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed 1D sine-cosine position embedding ``(T, dim)``: first half sin, second half cos."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) times. t: ``(B,)`` -> ``(B, dim)`` as ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def as_parameter_dtype(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the dtype of ``module``'s parameters, so that a model cast to bfloat16 takes float32 inputs (as
    diffusers models do); the public entry points (encode / decode / forward) call it. Non-float ``x`` unchanged."""
    return x.to(next(module.parameters()).dtype) if x.is_floating_point() else x


def init_vit_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights, zero biases, unit norms (the usual ViT init); use with ``Module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
