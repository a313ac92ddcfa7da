"""Frechet distances (FID / sFID), streaming float64 statistics, ADM ``.npz`` batches, and the two
evaluation entry points: :func:`evaluate_samples` (gFID, sFID, IS, precision, recall) and
:class:`ReconstructionEvaluator` (rFID, PSNR, SSIM, LPIPS).

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

import contextlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from maetok.eval.inception import POOL3_DIM, InceptionFeatures, InceptionV3, load_inception
from maetok.eval.metrics import (
    IS_SPLIT_SIZE,
    ReconstructionMeter,
    inception_score,
    inception_score_split_note,
    inception_score_split_sizes,
    precision_recall,
    to_uint8,
)

__all__ = [
    "FeatureStats",
    "InceptionStats",
    "NpzFormatError",
    "ReconstructionEvaluator",
    "ReferenceBatch",
    "compute_fid_stats",
    "evaluate_samples",
    "extract_features",
    "frechet_distance",
    "iter_image_batches",
    "iter_npz_images",
    "load_reference_batch",
    "load_sample_batch",
    "load_stats_npz",
    "save_reference_stats",
    "save_sample_batch",
]

PathLike = Union[str, Path]
Images = Union[Tensor, np.ndarray, PathLike, Iterable[Union[Tensor, np.ndarray]]]


class NpzFormatError(ValueError):
    """An ``.npz`` batch lacks a key or holds an array of the wrong dtype / shape; the message names both."""


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
# ADM .npz I/O
# ---------------------------------------------------------------------------------------------------------


def _npz_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise NpzFormatError(f"{path}: not an .npz archive")
    with zipfile.ZipFile(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def _require_key(path: Path, key: str, keys: list[str]) -> None:
    if key not in keys:
        raise NpzFormatError(f"{path}: missing key {key!r} (keys present: {sorted(keys)})")


def _check_images_header(path: Path, key: str, shape: tuple, dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise NpzFormatError(f"{path}: {key!r} must be uint8 images, got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise NpzFormatError(f"{path}: {key!r} must be NHWC images (N, H, W, 3), got shape {tuple(shape)}")


@contextlib.contextmanager
def _open_npy_member(path: Path, key: str) -> Iterator[tuple[Any, tuple, np.dtype, bool]]:
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            shape, fortran_order, dtype = None, True, None  # unknown header: caller falls back to np.load
        yield member, shape, dtype, bool(fortran_order)


def iter_npz_images(path: PathLike, batch_size: int = 256, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream uint8 NHWC images ``(b, H, W, 3)`` from an ADM ``.npz`` without loading the whole array."""
    path = Path(path)
    _require_key(path, key, _npz_keys(path))
    with _open_npy_member(path, key) as (member, shape, dtype, fortran_order):
        if shape is None or fortran_order or dtype.hasobject:
            images = _load_array(path, key)
            _check_images_header(path, key, images.shape, images.dtype)
            for i in range(0, images.shape[0], batch_size):
                yield images[i : i + batch_size]
            return
        _check_images_header(path, key, shape, dtype)
        per_image = int(np.prod(shape[1:]))
        remaining = shape[0]
        while remaining > 0:
            count = min(batch_size, remaining)
            nbytes = count * per_image * dtype.itemsize
            data = member.read(nbytes)
            if len(data) != nbytes:
                raise NpzFormatError(f"{path}: {key!r} is truncated ({len(data)} of {nbytes} bytes in a batch)")
            yield np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(shape[1:]))
            remaining -= count


def _npz_array_length(path: Path, key: str) -> int:
    with _open_npy_member(path, key) as (_, shape, _dtype, _fortran):
        if shape is None:
            return len(_load_array(path, key))
        return int(shape[0])


def _load_array(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data[key]


def load_sample_batch(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a whole ADM sample batch: ``(images uint8 (N, H, W, 3), labels (N,) or None)``."""
    path = Path(path)
    keys = _npz_keys(path)
    _require_key(path, "arr_0", keys)
    images = _load_array(path, "arr_0")
    _check_images_header(path, "arr_0", images.shape, images.dtype)
    labels = _load_array(path, "arr_1") if "arr_1" in keys else None
    if labels is not None and labels.shape != (images.shape[0],):
        raise NpzFormatError(f"{path}: 'arr_1' labels must have shape ({images.shape[0]},), got {labels.shape}")
    return images, labels


def _to_nhwc_uint8(images: Union[Tensor, np.ndarray], what: str) -> np.ndarray:
    if isinstance(images, Tensor):
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.permute(0, 2, 3, 1)
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{what}: images must be uint8 (use maetok.eval.metrics.to_uint8), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what}: images must be (N, H, W, 3) or a torch (N, 3, H, W) tensor, got {images.shape}")
    return np.ascontiguousarray(images)


def save_sample_batch(path: PathLike, images: Union[Tensor, np.ndarray],
                      labels: Optional[Union[Tensor, np.ndarray]] = None) -> Path:
    """Write an ADM sample batch: ``np.savez(path, arr_0=uint8 NHWC, arr_1=int64 labels)``.

    images: uint8 ``(N, H, W, 3)`` array or uint8 ``(N, 3, H, W)`` tensor. Returns the written path
    (``.npz`` appended when missing, as numpy does).
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    array = _to_nhwc_uint8(images, f"save_sample_batch({path})")
    payload = {"arr_0": array}
    if labels is not None:
        label_array = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64)
        if label_array.shape != (array.shape[0],):
            raise ValueError(f"labels must have shape ({array.shape[0]},), got {label_array.shape}")
        payload["arr_1"] = label_array
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **payload)
    return path


def save_reference_stats(path: PathLike, stats: InceptionStats,
                         images: Optional[Union[Tensor, np.ndarray]] = None) -> Path:
    """Write an ADM reference batch: ``mu, sigma`` (+ ``mu_s, sigma_s``, + ``arr_0`` uint8 NHWC images for
    precision / recall). Returns the written path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    payload: dict[str, np.ndarray] = {"mu": np.asarray(stats.mu), "sigma": np.asarray(stats.sigma)}
    if stats.mu_s is not None:
        payload["mu_s"], payload["sigma_s"] = np.asarray(stats.mu_s), np.asarray(stats.sigma_s)
    if images is not None:
        payload["arr_0"] = _to_nhwc_uint8(images, f"save_reference_stats({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **payload)
    return path


def load_stats_npz(path: PathLike) -> InceptionStats:
    """Read ``mu, sigma`` (required) and ``mu_s, sigma_s`` (optional) from an ADM ``.npz``, checking shapes."""
    path = Path(path)
    keys = _npz_keys(path)
    for key in ("mu", "sigma"):
        _require_key(path, key, keys)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
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
    num = _npz_array_length(path, "arr_0") if "arr_0" in keys else None
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
    keys = _npz_keys(path)
    if "mu" not in keys and "arr_0" not in keys:
        raise NpzFormatError(f"{path}: a reference batch needs 'arr_0' images and/or 'mu, sigma' (keys: {sorted(keys)})")
    num = None
    if "arr_0" in keys:
        with _open_npy_member(path, "arr_0") as (_, shape, dtype, _fortran):
            if shape is not None:
                _check_images_header(path, "arr_0", shape, dtype)
        num = _npz_array_length(path, "arr_0")
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
        return _npz_array_length(Path(images), "arr_0")
    if isinstance(images, (Tensor, np.ndarray)):
        return int(images.shape[0])
    return len(images.dataset) if hasattr(images, "dataset") else None  # DataLoader


def _feature_batches(images: Images, inception: InceptionV3, batch_size: int, progress: bool,
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
    for features in _feature_batches(images, inception, batch_size, progress, "inception features"):
        for name in keep:
            value = getattr(features, name)
            if value is not None:
                collected[name].append(value.float().cpu().numpy())
    return {name: (np.concatenate(parts) if parts else None) for name, parts in collected.items()}


def compute_fid_stats(images: Images, inception: InceptionV3, batch_size: int = 100,
                      progress: bool = True) -> InceptionStats:
    """Streaming FID / sFID statistics (float64) of an image set; see :func:`extract_features` for inputs."""
    pool, spatial = FeatureStats(), FeatureStats()
    for features in _feature_batches(images, inception, batch_size, progress, "fid stats"):
        pool.update(features.pool3)
        spatial.update(features.spatial)
    return InceptionStats(pool.mean(), pool.cov(), spatial.mean(), spatial.cov(), pool.num)


def _warn_small(num: int, what: str) -> None:
    if num < POOL3_DIM:
        warnings.warn(
            f"{what}: only {num} images (< {POOL3_DIM}); the covariance is rank deficient and this FID is "
            "not comparable with FID-10k / FID-50k numbers",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def evaluate_samples(samples: Images, reference: Union[PathLike, ReferenceBatch, InceptionStats],
                     inception: Optional[InceptionV3] = None, batch_size: int = 100,
                     precision_recall_k: Optional[int] = 3, inception_score_split_size: int = IS_SPLIT_SIZE,
                     progress: bool = True) -> dict[str, Any]:
    """ADM-style generation metrics of ``samples`` against a reference batch.

    samples: uint8 NHWC array / ``(N, 3, H, W)`` uint8 tensor / ADM sample ``.npz`` path / iterable of batches.
    reference: an ADM reference ``.npz`` path (``mu, sigma, mu_s, sigma_s`` and/or ``arr_0``), a
    :class:`ReferenceBatch`, or bare :class:`InceptionStats` (then no precision / recall).
    inception: defaults to :func:`maetok.eval.inception.load_inception`.

    Returns ``fid``, ``sfid``, ``inception_score`` (mean over consecutive splits of
    ``inception_score_split_size`` samples, as ADM: 10 splits at 50k, one below 5000) with
    ``inception_score_std``, ``inception_score_split_size`` and ``inception_score_splits`` (``None`` when the
    weights have no classifier), ``precision``, ``recall`` (``None`` when the reference has no images or
    ``precision_recall_k`` is ``None``), ``num_samples``, ``num_reference`` and ``notes`` (why a metric is missing).
    """
    if inception is None:
        inception = load_inception()
    notes: list[str] = []
    if isinstance(reference, (str, Path)):
        reference = load_reference_batch(reference)
    if isinstance(reference, InceptionStats):
        ref_stats, ref_images_path = reference, None
    else:
        ref_stats, ref_images_path = reference.stats, (reference.path if reference.has_images else None)

    want_pr = precision_recall_k is not None
    ref_pool3 = None
    if ref_images_path is not None and (ref_stats is None or ref_stats.mu_s is None or want_pr):
        pool, spatial = FeatureStats(), FeatureStats()
        parts = []
        for features in _feature_batches(ref_images_path, inception, batch_size, progress, "reference"):
            pool.update(features.pool3)
            spatial.update(features.spatial)
            parts.append(features.pool3.float().cpu())
        ref_pool3 = torch.cat(parts)
        if ref_stats is None or ref_stats.mu_s is None:
            ref_stats = InceptionStats(pool.mean(), pool.cov(), spatial.mean(), spatial.cov(), pool.num)
    if ref_stats is None:
        raise ValueError("reference has neither statistics nor images")

    pool, spatial = FeatureStats(), FeatureStats()
    sample_pool3, sample_logits = [], []
    for features in _feature_batches(samples, inception, batch_size, progress, "samples"):
        pool.update(features.pool3)
        spatial.update(features.spatial)
        if want_pr:
            sample_pool3.append(features.pool3.float().cpu())
        if features.logits is not None:
            sample_logits.append(features.logits.double().cpu())
    _warn_small(pool.num, "evaluate_samples")
    sample_stats = InceptionStats(pool.mean(), pool.cov(), spatial.mean(), spatial.cov(), pool.num)

    result: dict[str, Any] = {
        "num_samples": pool.num,
        "num_reference": ref_stats.num_images,
        "fid": sample_stats.fid(ref_stats),
        "sfid": sample_stats.sfid(ref_stats) if ref_stats.mu_s is not None else None,
        "inception_score": None,
        "inception_score_std": None,
        "inception_score_split_size": None,
        "inception_score_splits": None,
        "precision": None,
        "recall": None,
    }
    if result["sfid"] is None:
        notes.append("sFID not computed: the reference has no spatial statistics (mu_s, sigma_s) nor images")
    if sample_logits:
        result["inception_score"], result["inception_score_std"] = inception_score(
            torch.cat(sample_logits), inception_score_split_size)
        result["inception_score_split_size"] = inception_score_split_size
        result["inception_score_splits"] = len(inception_score_split_sizes(pool.num, inception_score_split_size))
        note = inception_score_split_note(pool.num, inception_score_split_size)
        notes += [note] if note else []
    else:
        notes.append("Inception Score not computed: these Inception weights have no 1008-way classifier "
                     "(load pytorch-fid's pt_inception-2015-12-05-6726825d.pth for IS)")
    if want_pr:
        if ref_pool3 is None:
            notes.append("precision/recall not computed: the reference batch has no arr_0 images")
        else:
            result.update(precision_recall(ref_pool3, torch.cat(sample_pool3), k=precision_recall_k,
                                           device=inception.device))
    result["notes"] = notes
    return result


class ReconstructionEvaluator:
    """rFID, PSNR, SSIM and LPIPS of a tokenizer over batches of (originals, reconstructions).

    ``update(originals, reconstructions)``: float ``(B, 3, H, W)`` in [-1, 1] (converted with ``to_uint8``,
    exactly as saved images would be) or uint8. rFID compares the reconstructions with the originals seen by
    ``update`` (ADM center-cropped ImageNet val in the paper), or with ``reference_stats`` when given (then
    the originals skip the Inception pass). ``compute()`` returns ``rfid``, ``psnr``, ``ssim``
    (data_range 1), ``ssim_dr2`` (data_range 2, tokenizer-paper convention), ``lpips`` (LPIPS-VGG, when
    ``lpips``; computed on ``lpips_device``, default the inputs' device), ``num_images``, ``rfid_reference``.
    """

    def __init__(self, inception: Optional[InceptionV3] = None,
                 reference_stats: Optional[Union[InceptionStats, PathLike]] = None, lpips: bool = True,
                 lpips_device: Optional[Union[str, torch.device]] = None) -> None:
        self.inception = inception if inception is not None else load_inception()
        if isinstance(reference_stats, (str, Path)):
            reference_stats = load_stats_npz(reference_stats)
        self.reference_stats = reference_stats
        self.original_stats = FeatureStats()
        self.reconstruction_stats = FeatureStats()
        self.meter = ReconstructionMeter(lpips=lpips, device=lpips_device)

    @staticmethod
    def _uint8(images: Union[Tensor, np.ndarray]) -> Tensor:
        x = torch.as_tensor(images).detach()
        return x if x.dtype == torch.uint8 else to_uint8(x)

    def update(self, originals: Union[Tensor, np.ndarray], reconstructions: Union[Tensor, np.ndarray]) -> None:
        originals_u8, reconstructions_u8 = self._uint8(originals), self._uint8(reconstructions)
        self.meter.update(originals_u8, reconstructions_u8)
        self.reconstruction_stats.update(self.inception(reconstructions_u8).pool3)
        if self.reference_stats is None:
            self.original_stats.update(self.inception(originals_u8).pool3)

    def compute(self) -> dict[str, Any]:
        result: dict[str, Any] = dict(self.meter.compute())
        _warn_small(self.reconstruction_stats.num, "ReconstructionEvaluator")
        mu, sigma = self.reconstruction_stats.mean(), self.reconstruction_stats.cov()
        if self.reference_stats is not None:
            ref_mu, ref_sigma = self.reference_stats.mu, self.reference_stats.sigma
            result["rfid_reference"] = "given reference statistics"
        else:
            ref_mu, ref_sigma = self.original_stats.mean(), self.original_stats.cov()
            result["rfid_reference"] = "the original images"
        result["rfid"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
        return result
