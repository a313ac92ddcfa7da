"""The simplest models that do a tokenizer's and a generator's job, as yardsticks for trained ones.

* :class:`PCABaseline`: the linear tokenizer with ``dim`` numbers per image (PCA of the flattened pixels). A
  trained tokenizer with ``L x H = dim`` latent numbers should reconstruct better than it.
* :class:`GaussianGenerator`: one Gaussian per class (or one for all) fitted on the PCA codes and decoded by
  the PCA. A trained generator should be closer to the data (lower gFID) than it.
* the real-vs-real FID floor: held-out images against as many training images, the lowest FID a perfect
  generator could reach with this many samples.

:func:`compute_baselines` measures all three against the same reference images as the trained models
(``maetok baselines``, the demo and the study report them side by side).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from maetok.data.images import to_uint8
from maetok.errors import ConfigError

__all__ = ["GaussianGenerator", "PCABaseline", "compute_baselines"]

_EXACT_COVARIANCE_MAX_DIM = 8192  # up to this many pixels per image, PCA from the exact D x D covariance


class PCABaseline:
    """PCA of flattened images: ``encode (B, C, H, W) -> (B, dim)``, ``decode (B, dim) -> (B, C, H, W)``.

    Fitted on images in [-1, 1] (any ``(N, C, H, W)`` float tensor); ``dim`` components of largest variance.
    ``explained_variance``: the fraction of the training variance the components keep.
    """

    def __init__(self, mean: Tensor, components: Tensor, image_shape: tuple[int, int, int], explained_variance: float):
        self.mean = mean  # (D,) float64
        self.components = components  # (D, dim) float64, orthonormal columns
        self.image_shape = tuple(image_shape)
        self.explained_variance = float(explained_variance)

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @classmethod
    def fit(cls, images: Tensor, dim: int, seed: int = 0) -> "PCABaseline":
        """images ``(N, C, H, W)``; ``dim`` <= min(N, C*H*W). Exact (covariance eigendecomposition in float64)
        up to 8192 pixel values per image, randomized SVD above."""
        if images.dim() != 4:
            raise ValueError(f"PCA baseline: expected images (N, C, H, W), got {tuple(images.shape)}")
        n, d = images.shape[0], images[0].numel()
        if not 1 <= dim <= min(n, d):
            raise ValueError(f"PCA baseline: dim={dim} must be in [1, min(images, pixels per image)] = [1, {min(n, d)}]")
        x = images.reshape(n, d).double()
        mean = x.mean(0)
        centred = x - mean
        total = centred.pow(2).sum().item()
        if d <= _EXACT_COVARIANCE_MAX_DIM:
            eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
            order = eigenvalues.argsort(descending=True)[:dim]
            components, kept = eigenvectors[:, order], eigenvalues[order].clamp_min(0).sum().item()
        else:
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(centred, q=min(dim + 10, n, d), niter=4)
            components, kept = v[:, :dim], s[:dim].pow(2).sum().item()
        explained = kept / total if total > 0 else 1.0
        return cls(mean, components, tuple(images.shape[1:]), explained)

    def encode(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> codes ``(B, dim)`` float64."""
        return (images.reshape(images.shape[0], -1).double() - self.mean) @ self.components

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``(B, dim)`` -> images ``(B, C, H, W)`` float32 in [-1, 1] (clamped)."""
        flat = codes.double() @ self.components.T + self.mean
        return flat.reshape(codes.shape[0], *self.image_shape).float().clamp(-1, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


class GaussianGenerator:
    """A full-covariance Gaussian per class (``labels`` given) or one for all, in a code space.

    ``fit(codes (N, d), labels (N,) or None)``; ``sample(labels (B,) or None, num, generator) -> (B, d)``.
    Classes with fewer than ``d + 1`` samples get the pooled covariance (their own would be singular).
    """

    def __init__(self, means: Tensor, cholesky: Tensor, classes: Optional[Tensor]):
        self.means = means  # (K, d) float64
        self.cholesky = cholesky  # (K, d, d) lower-triangular factors of the covariances
        self.classes = classes  # (K,) int64 class ids, None = unconditional

    @property
    def conditional(self) -> bool:
        return self.classes is not None

    @classmethod
    def fit(cls, codes: Tensor, labels: Optional[Tensor] = None, jitter: float = 1e-6) -> "GaussianGenerator":
        codes = codes.double()
        d = codes.shape[1]
        pooled = torch.cov(codes.T).reshape(d, d)
        if labels is None:
            groups, classes = [codes], None
        else:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            classes = labels.unique()
            groups = [codes[labels == c] for c in classes]
        means, factors = [], []
        for group in groups:
            cov = torch.cov(group.T).reshape(d, d) if len(group) > d else pooled
            scale = cov.diagonal().mean().clamp_min(1e-12)
            factors.append(torch.linalg.cholesky(cov + jitter * scale * torch.eye(d, dtype=cov.dtype)))
            means.append(group.mean(0))
        return cls(torch.stack(means), torch.stack(factors), classes)

    def sample(self, labels: Optional[Tensor] = None, num: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Codes ``(B, d)``: one per entry of ``labels`` (class-conditional), or ``num`` draws whose Gaussian
        (class) is picked uniformly at random."""
        k, d = self.means.shape
        if labels is None:
            if num is None:
                raise ValueError("GaussianGenerator.sample needs labels or num")
            index = torch.randint(0, k, (num,), generator=generator)
        else:
            if not self.conditional:
                raise ValueError("this Gaussian was fitted without labels: sample(num=...) instead")
            labels = torch.as_tensor(labels, dtype=torch.int64)
            lookup = {int(c): i for i, c in enumerate(self.classes)}
            unknown = sorted({int(c) for c in labels} - set(lookup))
            if unknown:
                raise ValueError(f"no Gaussian was fitted for classes {unknown}; known: {sorted(lookup)}")
            index = torch.tensor([lookup[int(c)] for c in labels], dtype=torch.int64)
        noise = torch.randn(len(index), d, generator=generator, dtype=torch.float64)
        return self.means[index] + torch.einsum("bij,bj->bi", self.cholesky[index], noise)


def _uint8_nhwc(images: Tensor) -> np.ndarray:
    return to_uint8(images, channels_last=True).numpy()


def compute_baselines(
    train_images: Tensor,
    train_labels: Optional[Tensor],
    eval_images: Tensor,
    dim: int,
    inception: Optional[torch.nn.Module] = None,
    reference: Any = None,
    sample_labels: Optional[Tensor] = None,
    lpips: bool = True,
    seed: int = 0,
    progress: bool = False,
    floor_images: Optional[Tensor] = None,
) -> dict[str, Any]:
    """PCA-``dim`` reconstruction metrics, the Gaussian generator's gFID and the real-vs-real FID floor.

    train_images ``(N, C, H, W)`` in [-1, 1] fit the PCA and the Gaussians (class-conditional when
    ``train_labels`` are given); eval_images ``(M, C, H, W)`` are the held-out reference (``reference``: their
    Inception statistics when already computed). The generator draws ``M`` samples, class-balanced over the
    training classes (``sample_labels`` overrides). The real-vs-real floor compares ``floor_images`` (default ``M``
    training images, a seeded draw) with the eval images. The Gaussian's decoder-free figures
    (:func:`~maetok.eval.generation.decoder_free_metrics`, under ``gaussian["decoder_free"]``) measure its samples
    against the PCA reconstructions of the eval images, with the PCA reconstructions of the floor images as their
    floor, exactly as a tokenizer's SiT is measured. Without ``inception`` the FIDs are None. The Inception
    features of these fixed image sets are memoised on disk (:func:`~maetok.eval.inception.memoized`).

    Returns ``{"pca": {...}, "gaussian": {...}, "real_vs_real": {...}}`` of plain numbers, plus
    ``"models": (pca, gaussian)``, ``"reconstructions"`` ``(M, C, H, W)`` and ``"samples"`` ``(M, C, H, W)``.
    """
    from maetok.eval.fid import compute_fid_stats
    from maetok.eval.generation import DecoderFreeReference, generation_metrics, reference_from_images
    from maetok.eval.inception import memoized
    from maetok.eval.reconstruction import ReconstructionEvaluator

    inception = memoized(inception)  # every image set here is a fixed function of the data: one pass per machine
    start = time.perf_counter()
    pca = PCABaseline.fit(train_images, dim, seed)
    fit_seconds = time.perf_counter() - start
    recon = torch.cat([pca.reconstruct(eval_images[i : i + 500]) for i in range(0, len(eval_images), 500)])
    if inception is not None and reference is None:
        reference = compute_fid_stats(_uint8_nhwc(eval_images), inception, progress=progress)
    evaluator = ReconstructionEvaluator(inception, reference, lpips=lpips, keep_features=inception is not None,
                                        progress=progress)
    evaluator.update(eval_images, recon)
    pca_result = {"dim": dim, "explained_variance": pca.explained_variance, "fit_seconds": fit_seconds,
                  "num_train": len(train_images), **evaluator.result()}

    codes = torch.cat([pca.encode(train_images[i : i + 1000]) for i in range(0, len(train_images), 1000)])
    gaussian = GaussianGenerator.fit(codes, train_labels)
    generator = torch.Generator().manual_seed(seed)
    m = len(eval_images)
    if gaussian.conditional:
        if sample_labels is None:  # class-balanced
            sample_labels = gaussian.classes[torch.arange(m) % len(gaussian.classes)]
        samples = pca.decode(gaussian.sample(sample_labels, generator=generator))
    else:
        samples = pca.decode(gaussian.sample(num=m, generator=generator))
    gaussian_result: dict[str, Any] = {"conditional": gaussian.conditional, "num_samples": m, "gfid": None}
    floor: dict[str, Any] = {"num_images": m, "fid": None}
    if inception is not None:
        if floor_images is None:
            floor_images = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed + 1))[:m]]
        floor_recon = torch.cat([pca.reconstruct(floor_images[i : i + 500]) for i in range(0, len(floor_images), 500)])
        decoder_free = DecoderFreeReference(
            evaluator.reconstruction_features(f"PCA-{dim} reconstructions of the eval images"),
            reference_from_images(_uint8_nhwc(floor_recon), inception, progress=progress,
                                  source=f"PCA-{dim} reconstructions of the floor images"))
        gen = generation_metrics(_uint8_nhwc(samples), reference, inception, precision_recall_k=None, progress=progress,
                                 decoder_free=decoder_free)
        gaussian_result.update(gfid=gen["gfid"], sfid=gen["sfid"], decoder_free=gen["decoder_free"])
        real = compute_fid_stats(_uint8_nhwc(floor_images), inception, progress=progress)
        floor["fid"] = real.fid(reference)
        floor["num_images"] = len(floor_images)
    return {"pca": pca_result, "gaussian": gaussian_result, "real_vs_real": floor, "models": (pca, gaussian),
            "samples": samples, "reconstructions": recon}


def load_split(data: str, split: str, image_size: int, channels: int, num: Optional[int],
               seed: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """``num`` images of a dataset split (a seeded draw, every class equally when it has classes:
    :func:`~maetok.data.draw_order`; all when None) as ``(N, C, S, S)`` in [-1, 1], with their labels (None when
    the dataset has no classes)."""
    from maetok.data import build_dataset, dataset_labels, draw_order, load_images

    dataset = build_dataset(data, split, image_size, channels)
    order, limit = draw_order(len(dataset), num, seed, dataset_labels(dataset))
    return load_images(dataset, order, limit=limit)


def run_baselines(data: str, dim: int, out, image_size: int = 32, channels: Optional[int] = None,
                  num_train: int = 20000, num_eval: int = 1000, lpips: bool = True,
                  device: Optional[str] = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """``maetok baselines``: :func:`compute_baselines` on a dataset (train split fits, test split measures);
    writes ``out/baselines.json`` and ``out/baselines.png`` (rows: originals, PCA reconstructions, Gaussian
    samples). ``channels`` defaults to the images' (:func:`~maetok.data.data_shape`, said in one line); ``progress``: bars over the
    Inception and LPIPS passes."""
    from pathlib import Path

    from maetok.data import data_shape, save_image_grid
    from maetok.eval.fid import fid_label
    from maetok.eval.inception import load_fid_network
    from maetok.eval.metrics import lpips_unavailable_reason
    from maetok.runs import write_json

    if dim < 1:
        raise ConfigError(f"--dim must be >= 1, got {dim}")
    shape = data_shape(data, image_size, channels=channels, image_size=image_size)
    print(f"[maetok] data: {shape.reason}", flush=True)
    channels = shape.channels
    out = Path(out)
    train_images, train_labels = load_split(data, "train", image_size, channels, num_train, seed)
    eval_images, _ = load_split(data, "test", image_size, channels, num_eval, seed)
    inception, reason = load_fid_network(device=device)
    lpips_reason = lpips_unavailable_reason() if lpips else "disabled (--no-lpips)"
    result = compute_baselines(train_images, train_labels, eval_images, dim, inception, lpips=lpips_reason is None,
                               seed=seed, progress=progress)
    grid = torch.cat([eval_images[:16], result["reconstructions"][:16], result["samples"][:16]])
    save_image_grid(grid, out / "baselines.png", nrow=min(16, len(eval_images)))
    m = len(eval_images)
    summary = {key: result[key] for key in ("pca", "gaussian", "real_vs_real")}
    summary.update(data=data, split_fit="train", split_eval="test", image_size=image_size, channels=channels,
                   fid_label=fid_label(m), seed=seed)
    if inception is None:
        summary["fid_note"] = f"FIDs not computed: {reason}"
    if lpips_reason is not None:
        summary["lpips_note"] = f"not computed: {lpips_reason}"
    write_json(out / "baselines.json", summary)
    return summary
