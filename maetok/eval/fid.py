"""Frechet distances (FID / sFID), streaming float64 statistics, ADM reference batches and Inception feature
passes: the FID machinery that :mod:`maetok.eval.reconstruction` (rFID) and :mod:`maetok.eval.generation`
(gFID, sFID, IS, precision / recall) share.

* :func:`frechet_distance` is computed in float64 with the symmetric eigenvalue form
  ``tr sqrt(S1 S2) = sum sqrt(eig(F^T S2 F))``, ``F F^T = S1`` (exact for PSD matrices, no
  ``scipy.linalg.sqrtm``).
* :class:`FeatureStats` accumulates mean and covariance (``np.cov`` normalisation, ``n - 1``) in float64,
  so the result does not depend on the batch size.
* ADM reference batches: ``arr_0`` uint8 NHWC images and/or ``mu, sigma, mu_s, sigma_s``; sample batches:
  ``arr_0`` uint8 NHWC, ``arr_1`` labels. ``arr_0`` is read in streaming batches (50k 256x256 images are
  10 GB).

Always report the number of images next to an FID (FID-10k, FID-50k): with fewer than ~2048 images the
covariance is rank deficient and FIDs across sample counts are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from maetok.data.npz import (
    NpzFormatError,
    as_nhwc_uint8,
    check_images_header,
    iter_npz_images,
    load_array,
    npz_array_length,
    npz_keys,
    open_npy_member,
    require_key,
)
from maetok.eval.inception import InceptionFeatures, InceptionV3
from maetok.runs import save_npz

__all__ = [
    "FeatureStats",
    "InceptionStats",
    "ReferenceBatch",
    "compute_fid_stats",
    "extract_features",
    "feature_batches",
    "fid_label",
    "frechet_distance",
    "iter_image_batches",
    "load_reference_batch",
    "load_stats_npz",
    "save_reference_stats",
    "stats_from_features",
]

PathLike = Union[str, Path]
Images = Union[Tensor, np.ndarray, PathLike, Iterable[Union[Tensor, np.ndarray]]]


# ---------------------------------------------------------------------------------------------------------
# Frechet distance and streaming statistics
# ---------------------------------------------------------------------------------------------------------


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; tiny negative eigenvalues are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
    """``F (D, rank)`` with ``F F^T = matrix`` for a (numerically) PSD matrix: LAPACK's pivoted Cholesky
    ``dpstrf``, which stops at the numerical rank, so singular covariances (fewer samples than dimensions)
    cost ``O(D^2 rank)``. Falls back to the symmetric square root when scipy is unavailable."""
    symmetric = np.ascontiguousarray((matrix + matrix.T) / 2.0)
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn / scikit-image
        return _sqrt_psd(symmetric)
    factor, pivots, rank, info = lapack.dpstrf(symmetric, lower=1)
    if info < 0:
        return _sqrt_psd(symmetric)
    lower = np.tril(factor)[:, :rank]
    result = np.empty_like(lower)
    result[pivots - 1] = lower  # P^T S P = L L^T  ->  S = (P L)(P L)^T
    return result


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``; the last trace is the sum of square roots of the
    eigenvalues of the symmetric PSD matrix ``F^T S2 F`` with ``F F^T = S1`` (pivoted Cholesky factor of
    rank ``r``), whose nonzero spectrum is that of ``S1 S2``: exact, no ``sqrtm``, and stable for singular
    covariances (tiny negative eigenvalues are clipped). mu: ``(D,)``, sigma: ``(D, D)``.
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"mean vectors must be (D,) of equal length, got {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}")
    for name, value in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    factor = _psd_factor(s1)  # S1 = F F^T, F: (D, rank)
    product = factor.T @ s2 @ factor  # (rank, rank), symmetric PSD, nonzero spectrum of S1 S2
    product = (product + product.T) / 2.0
    if np.count_nonzero(product - np.diag(np.diagonal(product))) == 0:
        eigenvalues = np.diagonal(product)  # already diagonal (e.g. identity covariances)
    else:
        eigenvalues = np.linalg.eigvalsh(product)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


class FeatureStats:
    """Streaming mean / covariance of feature vectors in float64 (``np.cov`` with ``n - 1``).

    Sums are taken around a fixed shift (the mean of the first batch) to avoid cancellation; the result is
    independent of how the features are split into batches (up to float64 rounding).
    """

    def __init__(self) -> None:
        self.num: int = 0
        self._shift: Optional[Tensor] = None
        self._sum: Optional[Tensor] = None
        self._outer: Optional[Tensor] = None

    def update(self, features: Union[Tensor, np.ndarray]) -> None:
        """features: ``(B, D)``; may live on any device (accumulation happens there, in float64)."""
        x = torch.as_tensor(features).detach().to(torch.float64)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update expects (B, D) features, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dim changed from {self._shift.shape[0]} to {x.shape[1]}")
        x = x.to(self._shift.device) - self._shift
        self._sum += x.sum(0)
        self._outer += x.t() @ x
        self.num += x.shape[0]

    def mean(self) -> np.ndarray:
        """``(D,)`` float64."""
        if self.num == 0:
            raise ValueError("FeatureStats: no features were added")
        return (self._shift + self._sum / self.num).cpu().numpy()

    def cov(self) -> np.ndarray:
        """``(D, D)`` float64 unbiased covariance."""
        if self.num < 2:
            raise ValueError(f"FeatureStats: covariance needs at least 2 features, got {self.num}")
        centred_sum = self._sum / self.num
        cov = (self._outer - self.num * torch.outer(centred_sum, centred_sum)) / (self.num - 1)
        return cov.cpu().numpy()


@dataclass
class InceptionStats:
    """FID statistics of an image set: pool3 ``mu (2048,)``, ``sigma (2048, 2048)``; spatial (sFID)
    ``mu_s (2023,)``, ``sigma_s (2023, 2023)`` when known; ``num_images`` when known."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    num_images: Optional[int] = None

    def fid(self, other: "InceptionStats") -> float:
        """FID between two sets (pool3)."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def sfid(self, other: "InceptionStats") -> float:
        """sFID between two sets (mixed_6/conv, 7 channels); both must carry spatial statistics."""
        if self.mu_s is None or other.mu_s is None:
            raise ValueError("sFID needs spatial statistics (mu_s, sigma_s) on both sides")
        return frechet_distance(self.mu_s, self.sigma_s, other.mu_s, other.sigma_s)


# ---------------------------------------------------------------------------------------------------------
# ADM reference batches (statistics; the image arrays are read by maetok.data.npz)
# ---------------------------------------------------------------------------------------------------------


def save_reference_stats(path: PathLike, stats: InceptionStats,
                         images: Optional[Union[Tensor, np.ndarray]] = None) -> Path:
    """Write an ADM reference batch: ``mu, sigma`` (+ ``mu_s, sigma_s``, + ``arr_0`` uint8 NHWC images for
    precision / recall), atomically (:func:`maetok.runs.save_npz`). Returns the written path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    payload: dict[str, np.ndarray] = {"mu": np.asarray(stats.mu), "sigma": np.asarray(stats.sigma)}
    if stats.mu_s is not None:
        payload["mu_s"], payload["sigma_s"] = np.asarray(stats.mu_s), np.asarray(stats.sigma_s)
    if images is not None:
        payload["arr_0"] = as_nhwc_uint8(images, f"save_reference_stats({path})")
    return save_npz(path, payload)


def load_stats_npz(path: PathLike) -> InceptionStats:
    """Read ``mu, sigma`` (required) and ``mu_s, sigma_s`` (optional) from an ADM ``.npz``, checking shapes."""
    path = Path(path)
    keys = npz_keys(path)
    for key in ("mu", "sigma"):
        require_key(path, key, keys)
    arrays = {k: load_array(path, k).astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mean_key not in arrays and cov_key not in arrays:
            continue
        if (mean_key in arrays) != (cov_key in arrays):
            raise NpzFormatError(f"{path}: has {mean_key!r} or {cov_key!r} but not both")
        mean, cov = arrays[mean_key], arrays[cov_key]
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise NpzFormatError(
                f"{path}: {mean_key!r} must be (D,) and {cov_key!r} (D, D), got {mean.shape} and {cov.shape}"
            )
    num = npz_array_length(path, "arr_0") if "arr_0" in keys else None
    return InceptionStats(arrays["mu"], arrays["sigma"], arrays.get("mu_s"), arrays.get("sigma_s"), num)


@dataclass
class ReferenceBatch:
    """An ADM reference ``.npz``: precomputed statistics (if stored) and whether ``arr_0`` images exist."""

    path: Path
    stats: Optional[InceptionStats]
    num_images: Optional[int]

    @property
    def has_images(self) -> bool:
        return self.num_images is not None


def load_reference_batch(path: PathLike) -> ReferenceBatch:
    """Inspect an ADM reference batch: needs ``mu, sigma`` and/or ``arr_0`` (uint8 NHWC)."""
    path = Path(path)
    keys = npz_keys(path)
    if "mu" not in keys and "arr_0" not in keys:
        raise NpzFormatError(f"{path}: a reference batch needs 'arr_0' images and/or 'mu, sigma' (keys: {sorted(keys)})")
    num = None
    if "arr_0" in keys:
        with open_npy_member(path, "arr_0") as (_, shape, dtype, _fortran):
            if shape is not None:
                check_images_header(path, "arr_0", shape, dtype)
        num = npz_array_length(path, "arr_0")
    stats = load_stats_npz(path) if "mu" in keys else None
    return ReferenceBatch(path=path, stats=stats, num_images=num)


# ---------------------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------------------


def iter_image_batches(images: Images, batch_size: int) -> Iterator[Union[Tensor, np.ndarray]]:
    """Yield batches of at most ``batch_size`` images from an array / tensor ``(N, ...)``, a path to an
    ADM ``.npz`` (``arr_0``), or an iterable of batches (larger batches are split)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, (str, Path)):
        yield from iter_npz_images(images, batch_size)
        return
    if isinstance(images, (Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(f"images must be a 4-D batch, got shape {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
        return
    for batch in images:
        if isinstance(batch, (list, tuple)):  # (images, labels) from a DataLoader
            batch = batch[0]
        for i in range(0, batch.shape[0], batch_size):
            yield batch[i : i + batch_size]


def _num_images(images: Images) -> Optional[int]:
    if isinstance(images, (str, Path)):
        return npz_array_length(Path(images), "arr_0")
    if isinstance(images, (Tensor, np.ndarray)):
        return int(images.shape[0])
    return len(images.dataset) if hasattr(images, "dataset") else None  # DataLoader


def feature_batches(images: Images, inception: InceptionV3, batch_size: int, progress: bool,
                     desc: str) -> Iterator[InceptionFeatures]:
    total = _num_images(images)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in iter_image_batches(images, batch_size):
            yield inception(batch)
            bar.update(int(batch.shape[0]))


def extract_features(images: Images, inception: InceptionV3, batch_size: int = 100, progress: bool = True,
                     keep: Iterable[str] = ("pool3", "spatial", "logits")) -> dict[str, Optional[np.ndarray]]:
    """Inception features of all images as float32 arrays: ``pool3 (N, 2048)``, ``spatial (N, 2023)``,
    ``logits (N, 1008)`` (``None`` without classifier weights). ``keep`` selects which to return.

    images: uint8 NHWC array, uint8/float 0..255 ``(N, 3, H, W)`` tensor, ADM ``.npz`` path, or an
    iterable of such batches.
    """
    keep = tuple(keep)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    for features in feature_batches(images, inception, batch_size, progress, "inception features"):
        for name in keep:
            value = getattr(features, name)
            if value is not None:
                collected[name].append(value.float().cpu().numpy())
    return {name: (np.concatenate(parts) if parts else None) for name, parts in collected.items()}


def compute_fid_stats(images: Images, inception: InceptionV3, batch_size: int = 100,
                      progress: bool = True) -> InceptionStats:
    """Streaming FID / sFID statistics (float64) of an image set; see :func:`extract_features` for inputs."""
    pool, spatial = FeatureStats(), FeatureStats()
    for features in feature_batches(images, inception, batch_size, progress, "fid stats"):
        pool.update(features.pool3)
        spatial.update(features.spatial)
    return InceptionStats(pool.mean(), pool.cov(), spatial.mean(), spatial.cov(), pool.num)


def stats_from_features(pool3: np.ndarray, spatial: Optional[np.ndarray]) -> InceptionStats:
    """FID / sFID statistics of features already extracted: ``pool3 (N, 2048)``, ``spatial (N, 2023)`` or None."""
    pool = FeatureStats()
    pool.update(pool3)
    mu_s = sigma_s = None
    if spatial is not None:
        space = FeatureStats()
        space.update(spatial)
        mu_s, sigma_s = space.mean(), space.cov()
    return InceptionStats(pool.mean(), pool.cov(), mu_s, sigma_s, pool.num)


def fid_label(num: Optional[int]) -> str:
    """``1000 -> "1k"``, ``50000 -> "50k"``, ``1500 -> "1.5k"``, ``500 -> "500"`` (the FID-N suffix)."""
    if num is None:
        return "?"
    num = int(num)
    if num >= 1000:
        value = num / 1000
        return f"{value:.0f}k" if num % 1000 == 0 else f"{value:.1f}k".replace(".0k", "k")
    return str(num)
